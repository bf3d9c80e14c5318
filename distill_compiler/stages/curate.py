"""Validate, deduplicate, scrub PII and split the generated examples.

Order matters: PII is scrubbed first (placeholders make otherwise-equal messages equal),
then each example is validated against the spec, then duplicates are removed keeping the
first (log and teacher examples before augmented ones), then the rest is split, stratified
by label, and noisy copies are added to train only. Every dropped example is counted under
the rule that dropped it, with a few examples each in report.json.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

from ..data.records import PROBE_COHORTS
from ..errors import StageError
from ..spec.models import OUT_OF_SCOPE

VERSION = "1"
KIND = "splits"
KEYED_ON = ("task", "input", "output", "intents", "tools", "refusals", "data")
INPUTS = ("generate",)
# Only the examples: a generate rerun that answers everything from the request cache writes
# other counts to stats.json, and that alone must not retrain the student.
READS = {"generate": ("examples.jsonl",)}

REPORT_EXAMPLES = 3  # dropped examples shown per rule
SOURCE_PREFERENCE = {"log": 0, "teacher": 0, "augment": 1}  # lower is kept on a duplicate
MINHASH_PERMUTATIONS = 128
SHINGLE = 5  # characters per MinHash shingle: robust on short messages, unlike word n-grams


def run(ctx) -> dict:
    from ..data import records

    spec = ctx.spec
    generated = list(records.read_jsonl(ctx.inputs["generate"].file("examples.jsonl")))
    report = Report(len(generated))
    examples = (scrub(generated, report, targets=spec.task != "classify") if spec.data.pii_scrub
                else generated)
    validator = Validator(spec)
    valid = []
    for record in examples:
        problem = validator.problem(record)
        if problem:
            report.drop(problem[0], record, problem[1])
        else:
            valid.append(record)
    kept = deduplicate(valid, spec.data.near_duplicate_threshold, report)
    if not kept:
        raise StageError("curate", f"no example survived curation: {report.summary()}",
                         "look at the dropped rules in the report; fix the spec or the logs")
    probes = [r for r in kept if is_probe(r)]
    splits = split([r for r in kept if not is_probe(r)], spec.data.holdout, spec.data.seed,
                   stratum(spec.task))
    for name, part in split_probes(probes, spec.data.seed).items():
        splits[name] += part
    if "noise" in spec.data.registers and spec.task == "classify":
        splits["train"] += noise_copies(splits["train"], max(1, spec.data.noise_copies),
                                        spec.data.seed, records.message_field(spec.input.schema_))
    for name, part in splits.items():
        records.write_jsonl(ctx.out / f"{name}.jsonl", sorted(part, key=lambda r: r["id"]))
    if spec.task == "classify":
        from ..spec.models import class_labels

        present = {r["target"] for r in splits["train"]}
        labels = [label for label in class_labels(spec.intents, spec.refusals) if label in present]
        (ctx.out / "labels.json").write_text(json.dumps(labels) + "\n")
    body = report.finish(kept, splits, spec.task)
    (ctx.out / "report.json").write_text(json.dumps(body, indent=2, sort_keys=True,
                                                    ensure_ascii=False) + "\n")
    ctx.log(f"curate: kept {body['kept']} of {body['generated']}; {report.summary()}")
    return {"kept": body["kept"], "dropped": {k: v["count"] for k, v in body["dropped"].items()},
            "splits": body["splits"]}


class Report:
    def __init__(self, generated: int):
        self.generated = generated
        self.dropped: dict[str, dict] = {}
        self.scrubbed: Counter[str] = Counter()

    def drop(self, rule: str, record: dict, detail: str) -> None:
        entry = self.dropped.setdefault(rule, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < REPORT_EXAMPLES:
            entry["examples"].append({"id": record["id"], "input": record["input"],
                                      "target": record["target"], "detail": detail[:300]})

    def summary(self) -> str:
        parts = [f"{rule} {e['count']}" for rule, e in sorted(self.dropped.items())]
        return "dropped " + (", ".join(parts) if parts else "nothing")

    def finish(self, kept: list[dict], splits: dict[str, list[dict]], task: str) -> dict:
        per_label: dict = {}
        if task == "classify":
            for name, part in splits.items():
                for record in part:
                    counts = per_label.setdefault(record["target"], {"train": 0, "val": 0, "test": 0})
                    counts[name] += 1
        return {"generated": self.generated, "kept": len(kept),
                "dropped": dict(sorted(self.dropped.items())),
                "splits": {name: len(part) for name, part in splits.items()},
                "per_label": dict(sorted(per_label.items())),
                "pii_scrubbed": dict(sorted(self.scrubbed.items()))}


# --------------------------------------------------------------------------- PII

def scrub(examples: list[dict], report: Report, targets: bool) -> list[dict]:
    """Scrub inputs and traces, and targets too unless they are labels."""
    from ..data import records
    from ..data.pii import scrub_value

    out = []
    for record in examples:
        found: Counter[str] = Counter()
        changes = {"input": scrub_value(record["input"], found),
                   "messages": scrub_value(record["messages"], found)}
        if targets:
            changes["target"] = scrub_value(record["target"], found)
        if found:
            report.scrubbed.update(found)
            record = records.with_content(record, **changes)
        out.append(record)
    return out


# --------------------------------------------------------------------------- validation

class Validator:
    """The first rule an example breaks, as (rule, detail), or None."""

    def __init__(self, spec):
        from ..spec.models import class_labels

        self.task = spec.task
        self.input = _validator(spec.input.schema_)
        self.output = _validator(spec.output.schema_) if spec.output else None
        self.tools = {t.name: _validator(t.parameters) for t in spec.tools}
        self.labels = set(class_labels(spec.intents, spec.refusals))

    def problem(self, record: dict) -> tuple[str, str] | None:
        if self.task == "agent":
            return self._trace(record.get("messages"))
        error = _first_error(self.input, record["input"])
        if error:
            return "input_schema", error
        if self.task == "classify":
            if record["target"] not in self.labels:
                return "label", f"{str(record['target'])[:80]!r} is not a label of this spec"
            soft = record.get("soft")
            if soft and set(soft) - self.labels:
                return "label", f"soft labels outside the label set: {sorted(set(soft) - self.labels)}"
            return None
        error = _first_error(self.output, record["target"])
        return ("output_schema", error) if error else None

    def _trace(self, messages) -> tuple[str, str] | None:
        if not messages or not any(m.get("role") == "assistant" for m in messages):
            return "no_assistant_turn", "the trace has no assistant message"
        for message in messages:
            for call in message.get("tool_calls") or ():
                name = call.get("function", {}).get("name")
                if name not in self.tools:
                    return "unknown_tool", f"call to {name!r}, which the spec does not define"
                try:
                    arguments = json.loads(call["function"].get("arguments") or "")
                except (TypeError, ValueError):
                    return "tool_arguments", f"{name}: arguments are not a JSON string"
                error = _first_error(self.tools[name], arguments)
                if error:
                    return "tool_arguments", f"{name}: {error}"
        return None


def _validator(schema: dict):
    import jsonschema

    return jsonschema.validators.validator_for(schema)(schema)


def _first_error(validator, value) -> str | None:
    error = next(iter(validator.iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message


# --------------------------------------------------------------------------- duplicates

def dedup_text(record: dict) -> str:
    """What two examples are compared on: the strings of their input (or trace), in order,
    with case and spacing folded, so `Refund me ` and `refund  me` are the same message."""
    value = record["input"] if record["messages"] is None else record["messages"]
    return " | ".join(re.sub(r"\s+", " ", s.lower()).strip() for s in _strings(value))


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k in sorted(value) for s in _strings(value[k])]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [] if value is None else [str(value)]


def deduplicate(examples: list[dict], threshold: float, report: Report) -> list[dict]:
    """Keep the first of each group of exact or near duplicates (log and teacher first)."""
    from datasketch import MinHash, MinHashLSH

    ordered = sorted(examples, key=lambda r: SOURCE_PREFERENCE.get(r["source"], 1))
    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS) if threshold < 1 else None
    seen: dict[str, str] = {}
    kept = []
    for record in ordered:
        text = dedup_text(record)
        if text in seen:
            report.drop("duplicate", record, f"same input as {seen[text]}")
            continue
        seen[text] = record["id"]
        if lsh is not None:
            signature = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=1)
            signature.update_batch([s.encode() for s in shingles(text)])
            similar = lsh.query(signature)
            if similar:
                report.drop("near_duplicate", record, f"near {similar[0]}")
                continue
            lsh.insert(record["id"], signature)
        kept.append(record)
    return kept


def shingles(text: str) -> set[str]:
    if len(text) <= SHINGLE:
        return {text}
    return {text[i:i + SHINGLE] for i in range(len(text) - SHINGLE + 1)}


# --------------------------------------------------------------------------- splits

def stratum(task: str):
    """Classify splits keep each label's share; extract and agent keep each cohort's."""
    if task == "classify":
        return lambda r: str(r["target"])
    return lambda r: r["cohort"]


def split(examples: list[dict], holdout: float, seed: int, key) -> dict[str, list[dict]]:
    """Per stratum: val and test each get round(holdout * n) examples, at least one each when
    the stratum has three or more; the order within a stratum is a seeded shuffle of ids."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in examples:
        groups[key(record)].append(record)
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for name in sorted(groups):
        group = sorted(groups[name], key=lambda r: r["id"])
        random.Random(f"{seed}:{name}").shuffle(group)
        n = len(group)
        held = max(1, round(holdout * n)) if n >= 3 else 0
        held = min(held, (n - 1) // 2)  # train keeps at least one
        out["val"] += group[:held]
        out["test"] += group[held:2 * held]
        out["train"] += group[2 * held:]
    return out


def is_probe(record: dict) -> bool:
    """A teacher-written out-of-scope probe the teacher also labelled out of scope. The student
    never trains on these: a head taught an `out_of_scope` class from a few hundred probes
    learns those probes (Larson et al. 2019: 40 % recall that way, against 52 % for a plain
    threshold), while the detector, fitted on in-scope embeddings alone, needs them only to be
    chosen and measured. A probe the teacher labelled as an intent is an ordinary example."""
    return record.get("cohort") in PROBE_COHORTS and record["target"] == OUT_OF_SCOPE


def split_probes(probes: list[dict], seed: int) -> dict[str, list[dict]]:
    """Out-of-scope probes, per cohort, half to validation (which chooses the detector) and half
    to test (which measures it); none to train."""
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in probes:
        groups[record["cohort"]].append(record)
    for cohort in sorted(groups):
        group = sorted(groups[cohort], key=lambda r: r["id"])
        random.Random(f"{seed}:probes:{cohort}").shuffle(group)
        half = (len(group) + 1) // 2
        out["val"] += group[:half]
        out["test"] += group[half:]
    return out


def noise_copies(train: list[dict], copies: int, seed: int, field: str | None) -> list[dict]:
    from ..data import records
    from ..data.augment import copy_rng, noisy

    if field is None:
        return []
    out = []
    for record in train:
        text = record["input"].get(field) if isinstance(record["input"], dict) else None
        if not isinstance(text, str):
            continue
        for copy in range(copies):
            changed = noisy(text, copy_rng(seed, record["id"], copy))
            if changed == text:
                continue
            out.append(records.with_content(
                record, input={**record["input"], field: changed}, cohort="noise",
                source="augment", provenance={**record["provenance"], "augmented_from": record["id"]}))
    return out


__all__ = ["run", "split", "deduplicate", "Validator", "noise_copies"]
