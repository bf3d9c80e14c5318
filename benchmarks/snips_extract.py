"""SNIPS as structured extraction: compile an extract student on SNIPS's train_full queries, then
report intent accuracy and slot F1 on its validate queries, which the compiler never sees.

    python benchmarks/snips_extract.py [--train-per-intent N] [--eval-per-intent N]
                                       [--base ID] [--set student.epochs=2 ...]

Each query becomes a recorded log row `{"input": text, "output": {"intent": ..., "slots":
{slot type: value}}}`: the intent is one of the seven, the slots are the query's labelled spans
by type, each an optional string. A slot type that occurs more than once in a query (61 of
14,484 queries, 19 of them `restaurant_type`) keeps every value, joined by " | " in text order;
scoring splits them again. Why not arrays: the schema is in every prompt, and string-or-array
for 39 slot types doubles it (about 950 tokens against 500 with a fitted byte-level BPE), which
doubles CPU training time for 0.4% of the queries.

Prints (and writes to <workdir>/results.json): intent accuracy, slot precision/recall/F1 micro
over (slot type, value) pairs and per slot type, exact match of the whole answer, and schema
validity with and without constrained decoding, on validate minus the queries train_full also
has. CPU defaults subsample both sides per intent, seeded, for the default base
(`smollm2-135m`); `--base scratch:4x256` is the from-scratch student, `--set student.epochs=0`
the untuned base (zero-shot); `--train-per-intent 0 --eval-per-intent 0` uses everything (on a
GPU, with `--base gemma-3-270m`).
Data: ../shared/datasets/snips (CC0, Sonos; cite Coucke et al. 2018, arXiv:1805.10190), read in
place; the converted rows go to <workdir> (git-ignored).
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from harness import (  # benchmarks/ is on sys.path as the script's folder
    DATASETS,
    WORK,
    command,
    compile_spec,
    decoder_parser,
    write_jsonl,
    write_results,
    write_spec,
)

DATA = DATASETS / "snips" / "2017-06-custom-intent-engines"
DESCRIPTION = ("Read a voice-assistant request: name its intent and copy each slot value it "
               "mentions, word for word, under the slot's type.")
JOIN = " | "  # between the values of a slot type the query names more than once; no value has it


# --------------------------------------------------------------------------- files

def decode(raw: bytes) -> str:
    """The text of a SNIPS file. PlayMusic's train_full is UTF-8 except for emoji written as
    UTF-16 surrogate pairs each encoded on its own (CESU-8), which strict UTF-8 refuses. Those
    are re-paired into the real characters; decoding the whole file as latin-1 instead would
    garble every accented name in it (`Música`). Latin-1 stays the last resort."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return (raw.decode("utf-8", "surrogatepass")
                .encode("utf-16", "surrogatepass").decode("utf-16"))
    except UnicodeError:
        return raw.decode("latin-1")


def intents() -> list[str]:
    return sorted(p.name for p in DATA.iterdir() if p.is_dir())


def read_split(split: str) -> list[tuple[str, dict]]:
    """(text, output) for every query of a split (`train_full` or `validate`), intent by intent."""
    out = []
    for intent in intents():
        name = f"train_{intent}_full.json" if split == "train_full" else f"validate_{intent}.json"
        rows = json.loads(decode((DATA / intent / name).read_bytes()))[intent]
        out += [example(intent, row["data"]) for row in rows]
    return out


# --------------------------------------------------------------------------- queries -> rows

def example(intent: str, chunks: Sequence[dict]) -> tuple[str, dict]:
    """A query's text (its chunks joined) and the answer: the intent, and each slot type's value
    (its labelled chunk, trimmed), the values joined in text order when the type recurs."""
    values: dict[str, list[str]] = defaultdict(list)
    for chunk in chunks:
        if chunk.get("entity"):
            values[chunk["entity"]].append(chunk["text"].strip())
    slots = {slot: JOIN.join(found) for slot, found in values.items()}
    return "".join(c["text"] for c in chunks).strip(), {"intent": intent, "slots": slots}


def text_key(text: str) -> str:
    """What counts as the same query: case and spacing folded."""
    return " ".join(text.casefold().split())


def unseen(examples: Sequence[tuple[str, dict]], seen: Sequence[tuple[str, dict]]) -> list:
    """The examples whose text is not among `seen`'s (validate shares 0-3 queries per intent
    with train_full)."""
    known = {text_key(text) for text, _ in seen}
    return [e for e in examples if text_key(e[0]) not in known]


def per_intent_sample(examples: Sequence[tuple[str, dict]], n: int, seed: int) -> list:
    """A seeded sample of `n` examples of each intent, in their original order (all when 0)."""
    by_intent: dict[str, list[int]] = defaultdict(list)
    for i, (_, output) in enumerate(examples):
        by_intent[output["intent"]].append(i)
    keep: list[int] = []
    for intent, indices in sorted(by_intent.items()):
        keep += indices if not n or n >= len(indices) else random.Random(
            f"{seed}:{intent}").sample(indices, n)
    return [examples[i] for i in sorted(keep)]


def log_rows(examples: Sequence[tuple[str, dict]]) -> list[dict]:
    return [{"input": text, "output": output} for text, output in examples]


# --------------------------------------------------------------------------- spec

def output_schema(intent_names: Sequence[str], slot_types: Sequence[str]) -> dict:
    """The answer's schema: one of the intents, and each slot type as an optional string."""
    return {"type": "object",
            "properties": {"intent": {"enum": list(intent_names)},
                           "slots": {"type": "object",
                                     # A fresh dict each, so the spec's YAML has no anchors.
                                     "properties": {s: {"type": "string"} for s in sorted(slot_types)},
                                     "additionalProperties": False}},
            "required": ["intent", "slots"], "additionalProperties": False}


def slot_types(examples: Sequence[tuple[str, dict]]) -> list[str]:
    return sorted({slot for _, output in examples for slot in output["slots"]})


def spec_document(schema: dict, log: Path, base: str) -> dict:
    return {
        "name": "snips-extract",
        "task": "extract",
        "description": DESCRIPTION,
        "output": {"schema": schema},
        "teacher": {"logs": [str(log)]},
        # SNIPS queries are short and templated: near-duplicate removal would drop real queries
        # that differ in one slot value, so only exact repeats go.
        "data": {"holdout": 0.03, "seed": 0, "pii_scrub": False, "near_duplicate_threshold": 1.0},
        # A from-scratch student needs a far higher learning rate than a pretrained one.
        "student": {"base": base, "method": "sft", "epochs": 2, "batch_size": 16, "max_length": 1024,
                    "learning_rate": 1e-3 if base.startswith("scratch:") else 1e-4},
        # The benchmark reports int8 agreement (stages.export) and only stops on a broken export.
        "export": {"quantize": "int8", "max_new_tokens": 96, "min_parity": 0.5},
    }


def slot_lists(answer) -> dict | None:
    """An answer's slots with each joined value split into its values, so that every (slot
    type, value) pair scores on its own; None when the answer has no slots object."""
    slots = answer.get("slots") if isinstance(answer, dict) else None
    if not isinstance(slots, dict):
        return None
    return {slot: value.split(JOIN) if isinstance(value, str) else [value]
            for slot, value in slots.items()}


def extraction_metrics(predicted: Sequence[str | None], targets: Sequence[dict],
                       schema: dict) -> dict:
    """Intent accuracy, slot P/R/F1 micro over (slot type, value) pairs and per slot type, exact
    match of intent and slots, and schema validity, for answers given as JSON texts."""
    from distill_compiler.metrics.structured import (
        MALFORMED,
        canonical,
        extract_report,
        field_scores,
        parse_json,
    )

    answers = [parse_json(p) for p in predicted]
    got = [slot_lists(a) if a is not MALFORMED else None for a in answers]
    want = [slot_lists(t) for t in targets]
    # field_scores scores each list element under `slot[]`: one (slot type, value) pair each.
    slots = field_scores([MALFORMED if g is None else g for g in got], want)
    per_slot = {path.removesuffix("[]"): scores for path, scores in slots.pop("per_field").items()}
    intent_hits = [isinstance(a, dict) and a.get("intent") == t["intent"]
                   for a, t in zip(answers, targets)]
    exact = [hit and g is not None and canonical(g) == canonical(w)
             for hit, g, w in zip(intent_hits, got, want)]
    checked = extract_report(predicted, targets, [None] * len(targets), schema)
    n = len(targets)
    return {"n": n, "intent_accuracy": round(sum(intent_hits) / n, 4) if n else None,
            "slots": slots, "exact_match": round(sum(exact) / n, 4) if n else None,
            "parsed": checked["parsed"], "schema_validity": checked["schema_validity"],
            "per_slot": per_slot}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = decoder_parser(__doc__.split("\n\n")[0], WORK / "snips", "validate")
    parser.add_argument("--train-per-intent", type=int, default=40,
                        help="seeded sample of train_full queries per intent (0: all ~1,970)")
    parser.add_argument("--eval-per-intent", type=int, default=30,
                        help="seeded sample of validate queries per intent (0: all ~100)")
    args = parser.parse_args(argv)

    train_full = read_split("train_full")
    validate = unseen(read_split("validate"), train_full)
    train = per_intent_sample(train_full, args.train_per_intent, args.seed)
    evaluation = per_intent_sample(validate, args.eval_per_intent, args.seed)
    log = write_jsonl(args.workdir / "train.jsonl", log_rows(train))
    write_jsonl(args.workdir / "validate.jsonl", log_rows(evaluation))
    # Slot types from all of train_full, so a subsample does not shrink the schema.
    schema = output_schema(intents(), slot_types(train_full))
    spec_path = write_spec(args.workdir, spec_document(schema, log, args.base),
                           "benchmarks/snips_extract.py from ../shared/datasets/snips (CC0)")
    compiled = compile_spec(spec_path, args.sets, args.until)
    spec = compiled.spec
    results = {
        "command": command("snips_extract.py", argv),
        "student_base": spec.student.base,
        "from_scratch": spec.student.base.startswith("scratch:"),
        "data": {"train_full": len(train_full), "train_used": len(train),
                 "validate_unseen": len(validate), "validate_used": len(evaluation),
                 "slot_types": len(schema["properties"]["slots"]["properties"])},
        "compile_seconds": compiled.seconds,
        "stages": compiled.stages(),
    }
    artifacts = compiled.artifacts
    if "export" in artifacts:
        results.update(evaluate_validate(spec, artifacts["export"], evaluation, args.threads))
    write_results(args.workdir, results)


def evaluate_validate(spec, export_dir: Path, examples: Sequence[tuple[str, dict]],
                      threads: int | None) -> dict:
    """Validate queries through the shipped decoder (model.onnx), constrained and not, prompted
    exactly as in training."""
    from distill_compiler.data import records
    from distill_compiler.runtime.causal import CausalPolicy
    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.runtime.decoder import Decoder, Extract
    from distill_compiler.students.causal.data import points
    from distill_compiler.students.causal.evaluate import policy_dict

    chat = ChatFormat.from_dict(json.loads((export_dir / "chat.json").read_text()))
    field = records.message_field(spec.input.schema_)
    prompts = [chat.render(points(records.example(input={field: text}, target=output,
                                                  cohort="validate", source="log", provenance={}),
                                  spec, chat)[0].prompt, add_generation_prompt=True)
               for text, output in examples]
    schema, targets = spec.output.schema_, [output for _, output in examples]
    decoder = Decoder(export_dir, threads=threads)
    # The system turn's KV cache once, as a loaded bundle does (runtime.causal.load_causal).
    decoder.warm(CausalPolicy(policy_dict(spec, chat, threshold=0.0)).shared_prefix())
    out: dict = {"shipped_quantize": spec.export.quantize}
    for constrain in (True, False):
        started = time.perf_counter()
        completions = [decoder.complete(p, Extract(schema), spec.export.max_new_tokens,
                                        constrain=constrain) for p in prompts]
        seconds = time.perf_counter() - started
        name = "validate_" + ("constrained" if constrain else "unconstrained")
        tokens = sum(c.new_tokens for c in completions)
        out[name] = {**extraction_metrics([c.message.get("content") for c in completions],
                                          targets, schema),
                     "seconds": round(seconds, 1),
                     "tokens_per_s": round(tokens / seconds, 1) if seconds else None}
    return out


if __name__ == "__main__":
    main()
