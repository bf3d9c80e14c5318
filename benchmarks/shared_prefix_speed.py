"""The train stage's SFT with and without the shared-prefix pass, side by side in one run.

    python benchmarks/shared_prefix_speed.py SPEC [--conversations 24]

Builds the spec up to curate (cached), then trains the spec's base for one epoch over its
first N training conversations twice, from the same weights, with the trainer the train stage
uses (`students/causal/train.sft_trainer`): once with TRL's own forward pass (every row runs
the whole conversation, micro-batches sized by whole rows) and once with the system turn run
once per micro-batch (shared_prefix.py, micro-batches sized by what the rows do not share).
Both see the same conversations with the spec's batch size and learning rate.

Prints (and writes to <workdir>/results.json): trained tokens/s, seconds, the micro-batch
each ran and the first logged training loss of each (equal up to float rounding: the two
passes compute the same loss).
"""

from __future__ import annotations

import argparse
import copy
import time

from harness import WORK, command, curated_base, write_results


def time_sft(spec, records: list[dict], base, chat, share: bool, workdir) -> dict:
    import torch

    from distill_compiler.pipeline import Reporter
    from distill_compiler.students.causal.base import Base
    from distill_compiler.students.causal.train import sft_trainer
    from distill_compiler.students.causal.validate import StructuredValidation

    fresh = Base(copy.deepcopy(base.model), base.tokenizer, base.source)
    none = StructuredValidation([], spec, chat, base.tokenizer, 0)
    trainer = sft_trainer(fresh, [], spec, chat, records, [], none, torch.device("cpu"),
                          Reporter(), workdir, share_prefix=share)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = trainer.state.num_input_tokens_seen
    return {"seconds": round(seconds, 1), "trained_tokens": tokens,
            "tokens_per_second": round(tokens / seconds, 1),
            "micro_batch": trainer.args.per_device_train_batch_size,
            "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None}


def main(argv: list[str] | None = None) -> None:
    import torch

    from distill_compiler.data.records import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--conversations", type=int, default=24)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    compiled, base, chat = curated_base(args.spec)
    spec = compiled.spec
    spec = spec.model_copy(update={"student": spec.student.model_copy(
        update={"epochs": 1, "patience": 0})})
    records = list(read_jsonl(compiled.artifacts["curate"] / "train.jsonl"))[:args.conversations]
    out = WORK / "shared_prefix_speed"
    results = {"command": command("shared_prefix_speed.py", argv), "base": spec.student.base,
               "conversations": len(records), "batch_size": spec.student.batch_size,
               "variants": {name: time_sft(spec, records, base, chat, share, out / name)
                            for name, share in (("trl pass", False), ("shared prefix", True))}}
    plain, shared = results["variants"]["trl pass"], results["variants"]["shared prefix"]
    results["speedup"] = round(shared["tokens_per_second"] / plain["tokens_per_second"], 2)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)


if __name__ == "__main__":
    main()
