"""The zero-shot floor of a decoder spec: its untuned base, asked exactly as the trained student
is, scored with the measure training selects epochs on.

    python benchmarks/zero_shot.py examples/support-agent/spec.yaml [--points 32]

Builds the spec up to curate (cached), loads `student.base` with the chat markers the train
stage adds, and decodes the same fixed validation subset the train stage scores after every
epoch (students/causal/validate.py: the runtime's constraint, greedy), so the figure sits
beside each epoch's `val_agreement` / `val_field_f1` in the bundle's train log.

Prints (and writes to <workdir>/results.json): the score, its metric and the points decoded.
"""

from __future__ import annotations

import argparse

from harness import WORK, command, curated_base, write_results


def main(argv: list[str] | None = None) -> None:
    import torch

    from distill_compiler.data.records import read_jsonl
    from distill_compiler.students.causal.validate import StructuredValidation

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--points", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    compiled, base, chat = curated_base(args.spec)
    spec = compiled.spec
    val = list(read_jsonl(compiled.artifacts["curate"] / "val.jsonl"))
    validation = StructuredValidation(val, spec, chat, base.tokenizer,
                                      base.tokenizer.convert_tokens_to_ids(chat.end), args.points)
    score = validation.score(base.model.eval())
    out = WORK / "zero_shot"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, {"command": command("zero_shot.py", argv), "base": spec.student.base,
                        "metric": f"val_{validation.metric}", "score": round(score, 4),
                        "points": len(validation.points)})


if __name__ == "__main__":
    main()
