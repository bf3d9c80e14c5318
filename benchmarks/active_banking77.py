"""Active selection on banking77: the compiler gets train.csv as an unlabeled pool and pays a
stand-in teacher for labels, at several budgets, choosing actively and at random, in one run.

    python benchmarks/active_banking77.py [--sizes 500,1000,2000,3000,all] [--round-size 250]
                                          [--workdir DIR] [--set student.epochs=3 ...]

The stand-in teacher is an OpenAI-compatible server on loopback (tests/teacher_server.py, the
test double at the API boundary and nowhere else) that answers each labelling request with the
message's banking77 label and counts what it is paid. For every budget the same spec is
compiled twice, `data.selection: active` and `random`, with `teacher.pool: train.csv` and
`data.label_budget` set; all compiles share one build cache, so the stand-in's count shows that
a larger budget pays only for the labels it adds. Reported per compile, on banking77's
test.csv (which the compiler never sees): int8 test accuracy (the model's argmax), the rate the
out-of-scope detector flags, and the frozen-encoder probe's test accuracy on the same labels
(what selection alone buys, without fine-tuning). Data: ../shared/datasets/banking77
(CC BY 4.0, PolyAI), read in place.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from banking77 import DATA, TARGET_ACCURACY, label_name, read_test
from harness import (
    ROOT,
    WORK,
    command,
    compile_spec,
    replayed_classify_spec,
    write_results,
)
from harness import write_spec as harness_write_spec

sys.path.insert(0, str(ROOT / "tests"))
from teacher_server import FakeTeacher  # the stand-in teacher, at the API boundary only

SIZES = "500,1000,2000,3000,all"
MIN_PARITY = 0.95


class DatasetTeacher(FakeTeacher):
    """Answers a labelling request with the dataset's label of the message (the user turn is
    the message as written, teacher/templates/message.j2), and counts the labels it sold."""

    def __init__(self, gold: dict[str, str], port: int):
        super().__init__(port=port)
        self.gold = gold
        self.sold: set[str] = set()

    def label(self, text: str, labels: list[str]) -> str:
        self.sold.add(text)
        return self.gold.get(text.strip(), "out_of_scope")


def read_pool() -> dict[str, str]:
    """train.csv as {message: label}; a message repeated with another label keeps its first."""
    with open(DATA / "train.csv", newline="", encoding="utf-8") as f:
        gold: dict[str, str] = {}
        for row in csv.DictReader(f):
            gold.setdefault(row["text"].strip(), label_name(row["category"]))
    return gold


def write_spec(workdir: Path, name: str, api_base: str, size: int | None, selection: str,
               round_size: int) -> Path:
    categories = json.loads((DATA / "categories.json").read_text())
    spec = replayed_classify_spec(name, [label_name(c) for c in categories], DATA / "train.csv",
                                  {"target_accuracy": TARGET_ACCURACY})
    # The same recipe as benchmarks/banking77.py, but the CSV is a pool the teacher is paid to
    # label instead of a log that already holds the labels.
    spec["teacher"] = {"model": "openai/banking77-stand-in", "api_base": api_base,
                       "soft_labels": "none",
                       "max_concurrency": 32, "pool": [str(DATA / "train.csv")]}
    spec["data"].update(selection=selection, round_size=round_size,
                        **({"label_budget": size} if size else {}))
    # Int8 accuracy is measured on test directly, and small-budget students are unsure enough
    # that int8 flips more of their validation answers: the gate is lowered so every budget
    # ships int8, and each run records the variant and its parity.
    spec["export"]["min_parity"] = MIN_PARITY
    return harness_write_spec(workdir, spec, "benchmarks/active_banking77.py")


def pool_examples(train_dir: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of every labelled example curate kept, all splits."""
    texts, labels = [], []
    for split in ("train", "val", "test"):
        path = train_dir / f"{split}.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                record = json.loads(line)
                texts.append(record["input"]["message"])
                labels.append(record["target"])
    return texts, labels


def probe_accuracy(encoder, cache_root: Path, texts: list[str], labels: list[str],
                   classes: list[str], test_x: np.ndarray, gold: list[str]) -> float:
    """Test accuracy of the selection model (RoundModel) fitted on these labels."""
    from distill_compiler.data.active import RoundModel

    x = encoder.encode_cached(texts, cache_root)
    ids = [classes.index(label) if label in classes else None for label in labels]
    model = RoundModel.fit(x, ids, len(classes), seed=0)
    predicted = model.probs(test_x).argmax(axis=1)
    return round(float(np.mean([classes[p] == g for p, g in zip(predicted, gold)])), 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=WORK / "active_banking77")
    parser.add_argument("--sizes", default=SIZES, help="label budgets, `all` for the whole pool")
    parser.add_argument("--round-size", type=int, default=250)
    parser.add_argument("--port", type=int, default=18077,
                        help="the stand-in's port: api_base is part of the cache keys, so a "
                             "rerun on the same port pays nothing")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="spec override, as for `distill compile --set`")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    from distill_compiler import runtime
    from distill_compiler.data.embeddings import SentenceEncoder

    gold_pool = read_pool()
    texts, gold = read_test()
    encoder = SentenceEncoder("minilm-l6", args.workdir)
    results: dict = {"command": command("active_banking77.py", argv), "pool": len(gold_pool),
                     "test_rows": len(texts), "round_size": args.round_size, "runs": []}
    with DatasetTeacher(gold_pool, args.port) as teacher:
        for size_text in args.sizes.split(","):
            size = None if size_text == "all" else int(size_text)
            # With the whole pool both selections label the same requests: compiled once.
            for selection in ("active", "random") if size else ("random",):
                name = f"banking77-{selection}-{size_text}"
                spec_path = write_spec(args.workdir, name, teacher.api_base, size, selection,
                                       args.round_size)
                teacher.reset_counts()
                compiled = compile_spec(spec_path, args.sets)
                artifacts = compiled.artifacts
                bundle = runtime.load_bundle(compiled.project.bundle_dir)
                logits = bundle.classifier.logits(texts)
                predicted = [bundle.labels[i] for i in logits.argmax(-1)]
                flags = [a["route"] == "out_of_scope"
                         for a in bundle.predict_batch([{"message": t} for t in texts])]
                generate_stats = json.loads((artifacts["generate"] / "stats.json").read_text())
                labelled_texts, labelled = pool_examples(artifacts["curate"])
                test_x = encoder.encode_cached(texts, compiled.project.cache_root)
                run = {
                    "selection": selection, "label_budget": size,
                    "paid_this_compile": teacher.hits,
                    "labels_sold_so_far": len(teacher.sold),
                    "labelled": generate_stats["pool"]["labelled"],
                    "curated": len(labelled),
                    "int8_test_accuracy": round(float(np.mean(
                        [p == g for p, g in zip(predicted, gold)])), 4),
                    "bundle_out_of_scope_rate": round(float(np.mean(flags)), 4),
                    "probe_test_accuracy": probe_accuracy(
                        encoder, compiled.project.cache_root, labelled_texts, labelled,
                        list(bundle.labels), test_x, gold),
                    "int8": {k: v for k, v in (json.loads(
                        (artifacts["export"] / "parity.json").read_text()).get("int8") or {}).items()
                        if k in ("variant", "agreement")},
                    "compile_seconds": compiled.seconds,
                    "stages": {k: {"cached": v["cached"], "seconds": v["seconds"]}
                               for k, v in compiled.stages().items()},
                    "rounds": generate_stats["pool"]["rounds"],
                }
                results["runs"].append(run)
                print(f"{name}: paid {run['paid_this_compile']} (sold {run['labels_sold_so_far']}"
                      f" in all), int8 test {run['int8_test_accuracy']:.2%}, probe "
                      f"{run['probe_test_accuracy']:.2%}", flush=True)
                write_results(args.workdir, results)  # after every compile: a crash keeps these


if __name__ == "__main__":
    main()
