"""curate on hand-written generate artifacts: validation, dedup, PII, splits, noise, report."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest

from distill_compiler.artifacts import Artifact
from distill_compiler.data import records
from distill_compiler.data.augment import copy_rng, noisy
from distill_compiler.data.pii import iban_ok, luhn_ok, scrub
from distill_compiler.errors import StageError
from distill_compiler.pipeline import SpecView, StageContext
from distill_compiler.spec.load import parse_spec
from distill_compiler.stages import curate

SPEC = """
name: shop-router
task: classify
input:
  schema: {type: object, properties: {message: {type: string, maxLength: 80}}, required: [message]}
intents:
  - {name: billing, description: Charges and invoices.}
  - {name: refund, description: Money back.}
teacher: {logs: [log.jsonl]}
data: {holdout: 0.2, seed: 7, registers: [formal]}
"""
WORDS = ("amber basil cedar delta ember fjord garnet harbor indigo juniper kelp lagoon maple "
         "nectar onyx pepper quartz raven saffron tundra umber velvet willow xenon").split()


def message(i: int) -> str:
    return " ".join(random.Random(i).sample(WORDS, 6))


def record(text, target, source="log", cohort="log"):
    input = text if isinstance(text, dict) else {"message": text}
    return records.example(input=input, target=target, cohort=cohort, source=source,
                           provenance={"request": None, "model": None, "cost_usd": 0.0, "log": "x"})


def curate_run(tmp_path: Path, examples: list[dict], spec_text: str = SPEC):
    spec = parse_spec(spec_text)
    gen = tmp_path / f"gen-{uuid.uuid4().hex[:6]}"
    gen.mkdir()
    records.write_jsonl(gen / "examples.jsonl", examples)
    out = tmp_path / f"out-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    ctx = StageContext("curate", SpecView(spec, curate.KEYED_ON), tmp_path,
                       {"generate": Artifact(gen, "examples", "d", {})}, out, tmp_path / "cache")
    return out, curate.run(ctx)


def read(out: Path, name: str) -> list[dict]:
    return list(records.read_jsonl(out / name))


def balanced(n: int) -> list[dict]:
    return [record(message(i), "billing" if i % 2 else "refund") for i in range(n)]


def test_invalid_examples_are_dropped_by_rule_with_examples(tmp_path):
    bad = [record("x" * 100, "billing"), record({"msg": "hi"}, "refund"),
           record("nice weather", "weather"), record("nice weather today", None)]
    out, summary = curate_run(tmp_path, balanced(20) + bad)
    report = json.loads((out / "report.json").read_text())
    assert summary["dropped"] == {"input_schema": 2, "label": 2}
    assert report["dropped"]["label"]["examples"][0]["target"] == "weather"
    assert "is not a label" in report["dropped"]["label"]["examples"][0]["detail"]
    assert report["generated"] == 24 and report["kept"] == summary["kept"] == 20


def test_exact_and_near_duplicates_keep_the_first(tmp_path):
    base = balanced(20)
    text = base[0]["input"]["message"]
    dupes = [record(text.upper() + "  ", base[0]["target"], source="teacher"),
             record(text + "s", "billing", source="augment", cohort="noise")]
    out, summary = curate_run(tmp_path, dupes + base)
    assert summary["dropped"] == {"duplicate": 1, "near_duplicate": 1}
    kept = read(out, "train.jsonl") + read(out, "val.jsonl") + read(out, "test.jsonl")
    # The log original beats the augmented near-copy listed before it; the teacher's exact
    # copy (same rank as log) came first and stays.
    assert dupes[1]["id"] not in {r["id"] for r in kept}
    assert dupes[0]["id"] in {r["id"] for r in kept}


def test_pii_is_scrubbed_before_validation_and_ids_follow_content(tmp_path):
    pii = record("mail a.b@example.com or call +44 7700 900123", "billing")
    out, _ = curate_run(tmp_path, balanced(10) + [pii])
    kept = {r["input"]["message"]: r for name in ("train", "val", "test") for r in read(out, f"{name}.jsonl")}
    scrubbed = kept["mail [EMAIL] or call [PHONE]"]
    assert scrubbed["id"] == records.example_id(scrubbed["input"]) != pii["id"]
    report = json.loads((out / "report.json").read_text())
    assert report["pii_scrubbed"] == {"EMAIL": 1, "PHONE": 1}


def test_pii_patterns_check_cards_and_ibans():
    assert scrub("card 4111 1111 1111 1111.")[0] == "card [CARD]."
    assert scrub("ref 4111 1111 1111 1112")[0] == "ref 4111 1111 1111 1112"  # fails Luhn
    assert scrub("to GB82 WEST 1234 5698 7654 32 please")[0] == "to [IBAN] please"
    assert scrub("to GB00 WEST 1234 5698 7654 32")[0] == "to GB00 WEST 1234 5698 7654 32"
    assert scrub("order 123456789 on 2024-05-01 for 119.00")[1] == {}
    assert scrub("ring (555) 123-4567 or 020 7946 0018")[0] == "ring [PHONE] or [PHONE]"
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("DE89370400440532013000")


def test_split_is_stratified_deterministic_and_gives_small_labels_one_each(tmp_path):
    examples = balanced(40) + [record(f"{message(100 + i)} x", "out_of_scope") for i in range(3)]
    first, summary = curate_run(tmp_path, examples)
    second, _ = curate_run(tmp_path, list(reversed(examples)))
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "labels.json", "report.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    report = json.loads((first / "report.json").read_text())
    assert report["per_label"]["billing"] == {"train": 12, "val": 4, "test": 4}
    assert report["per_label"]["out_of_scope"] == {"train": 1, "val": 1, "test": 1}
    assert summary["splits"] == {"train": 25, "val": 9, "test": 9}
    assert json.loads((first / "labels.json").read_text()) == ["billing", "refund", "out_of_scope"]
    ids = [r["id"] for r in read(first, "train.jsonl")]
    assert ids == sorted(ids)


def test_noise_copies_go_to_train_only(tmp_path):
    spec = SPEC.replace("registers: [formal]", "registers: [formal, noise], noise_copies: 2")
    out, summary = curate_run(tmp_path, balanced(20), spec)
    train = read(out, "train.jsonl")
    noise = [r for r in train if r["cohort"] == "noise"]
    originals = {r["id"]: r for r in train if r["cohort"] != "noise"}
    assert len(noise) == 2 * len(originals) and summary["splits"]["train"] == 3 * len(originals)
    for copy in noise:
        source = originals[copy["provenance"]["augmented_from"]]
        assert copy["source"] == "augment" and copy["target"] == source["target"]
        assert copy["input"]["message"] != source["input"]["message"]
    assert not any(r["cohort"] == "noise" for r in read(out, "val.jsonl") + read(out, "test.jsonl"))


def test_noise_is_seeded():
    text = "I am not able to log in to my account, please help."
    assert noisy(text, copy_rng(0, "abc", 0)) == noisy(text, copy_rng(0, "abc", 0))
    variants = {noisy(text, copy_rng(0, "abc", i)) for i in range(10)}
    assert text not in variants and len(variants) > 5


def test_extract_targets_and_agent_tool_arguments_are_validated(tmp_path):
    extract = """
name: orders
task: extract
output: {schema: {type: object, properties: {items: {type: integer}}, required: [items]}}
student: {method: sft}
teacher: {logs: [log.jsonl]}
"""
    good = [record(message(i), {"items": i}) for i in range(6)]
    out, summary = curate_run(tmp_path, good + [record("two please", {"items": "two"}),
                                                record("raw", "{not json")], extract)
    assert summary["dropped"] == {"output_schema": 2} and summary["kept"] == 6

    agent = """
name: agent
task: agent
tools:
  - {name: move, description: Move it., parameters: {type: object, properties: {day: {type: string}}, required: [day]}}
student: {method: sft}
teacher: {logs: [log.jsonl]}
"""

    def trace(name, arguments):
        return records.example(input=None, target=None, cohort="log", source="log", provenance={}, messages=[
            {"role": "user", "content": f"move it {arguments}"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}]}])
    traces = [trace("move", json.dumps({"day": f"d{i}"})) for i in range(4)]
    traces += [trace("move", json.dumps({"when": "x"})), trace("move", "{oops"), trace("fly", "{}")]
    _, summary = curate_run(tmp_path, traces, agent)
    assert summary["dropped"] == {"tool_arguments": 2, "unknown_tool": 1} and summary["kept"] == 4


def test_nothing_left_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="no example survived curation: dropped label 1"):
        curate_run(tmp_path, [record("hello", "nope")])


def test_out_of_scope_probes_go_to_validation_and_test_only(tmp_path):
    probes = [record(f"{message(200 + i)} probe", "out_of_scope", "teacher", "out_of_scope_near")
              for i in range(6)]
    # A probe the teacher labelled as an intent is an ordinary example; logged out-of-scope
    # rows are the user's data and train as before.
    kept_in = record(f"{message(300)} probe", "billing", "teacher", "out_of_scope_far")
    logged = [record(f"{message(400 + i)} logged", "out_of_scope") for i in range(3)]
    out, _ = curate_run(tmp_path, balanced(40) + probes + [kept_in] + logged)
    split_of = {r["id"]: name for name in ("train", "val", "test") for r in read(out, f"{name}.jsonl")}
    assert sorted(split_of[p["id"]] for p in probes) == ["test"] * 3 + ["val"] * 3
    assert [split_of[r["id"]] for r in logged].count("train") == 1
    billing = json.loads((out / "report.json").read_text())["per_label"]["billing"]
    assert kept_in["id"] in split_of and sum(billing.values()) == 21  # split with billing's rows
    assert "out_of_scope" in json.loads((out / "labels.json").read_text())
