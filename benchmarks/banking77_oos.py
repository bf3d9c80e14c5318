"""BANKING77-OOS: does the student know what it was not trained on?

    python benchmarks/banking77_oos.py [--workdir DIR] [--set student.epochs=2 ...]

Compiles a spec whose teacher log is banking77-oos's train.csv (50 in-scope intents, no
out-of-scope rows), then scores every out-of-distribution detector the bundle can carry on the
dataset's own files: thresholds fitted on valid.csv (in-scope) at the false out-of-scope rate
the spec allows, the detector chosen on id_oos_valid.csv, and every figure reported on test:
in-scope accuracy (test.csv), in-domain out-of-scope recall (id_oos_test.csv), out-of-domain
recall (ood_oos_valid.csv: the dataset has no OOD test file, and it is never used to fit or
choose anything here), false out-of-scope rate on in-scope test, AUROC, and the cascade's
accepted accuracy and escalation at target 0.95 when 20 % of test traffic is out of scope.
The max-softmax baseline (calibrated confidence, no detector) sits beside each figure.

Data: ../shared/datasets/banking77-oos (BANKING77, CC BY 4.0, PolyAI; OOD queries from CLINC150,
CC BY 3.0), re-split by Zhang et al. 2021; read in place, never copied.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from harness import DATASETS, WORK, command, compile_spec, write_results  # noqa: E402
from harness import write_spec as harness_write_spec  # noqa: E402

DATA = DATASETS / "banking77-oos"
TARGET_ACCURACY = 0.95
MAX_FALSE_OUT_OF_SCOPE = 0.02
OOS_SHARE = 0.20
SEED = 0


def label_name(label: str) -> str:
    """banking77 spells a few labels loosely (`Refund_not_showing_up`, `reverted_card_payment?`);
    the log replay matches them to these names up to case and punctuation."""
    return re.sub(r"[^a-z0-9_]", "", label.lower())


def read(name: str) -> tuple[list[str], list[str]]:
    with open(DATA / name, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [label_name(r["label"]) for r in rows]


def write_spec(workdir: Path) -> Path:
    labels = sorted(set(read("train.csv")[1]))
    intents = "\n".join(
        f"  - {{name: {label}, description: \"{label.replace('_', ' ').capitalize()}.\"}}"
        for label in labels)
    spec = f"""name: banking77-oos
task: classify
intents:
{intents}
escalation:
  target_accuracy: {TARGET_ACCURACY}
  max_false_out_of_scope: {MAX_FALSE_OUT_OF_SCOPE}
  expected_out_of_scope: {OOS_SHARE}
teacher:
  logs: [{DATA / 'train.csv'}]
data:
  holdout: 0.08
  seed: 0
  pii_scrub: false
student:
  base: minilm-l6
  max_length: 64
export:
  quantize: int8
  max_length: 64
"""
    return harness_write_spec(workdir, spec,
                              "benchmarks/banking77_oos.py: banking77-oos's train.csv replayed as the teacher log")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=WORK / "banking77_oos")
    parser.add_argument("--until", default=None, help="last compiler stage to run")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="spec override, as for `distill compile --set`")
    args = parser.parse_args(argv)
    compiled = compile_spec(write_spec(args.workdir), args.sets, args.until)
    if args.until:
        return
    write_results(args.workdir, {"command": command("banking77_oos.py", argv),
                                 "compile_seconds": compiled.seconds})


if __name__ == "__main__":
    main()
