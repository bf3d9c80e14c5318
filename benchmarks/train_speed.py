"""Training throughput of a decoder base, full fine-tuning against LoRA, on the same batches.

    python benchmarks/train_speed.py examples/support-agent/spec.yaml [--steps 8] [--micro 2]

Builds the spec up to curate (cached), loads `student.base` as the train stage does, and times
AdamW steps over the first training conversations, rendered as the student sees them, for:
full fine-tuning, LoRA r16 on the attention projections (the spec default's targets), and
LoRA r16 on every linear layer. Each variant starts from the same weights and sees the same
micro-batches; logits are computed only at a few positions, as TRL's fused head does at the
labelled ones. The first two steps of each are warm-up and left out.

Prints (and writes to <workdir>/results.json): seconds per step and tokens/s per variant.
"""

from __future__ import annotations

import argparse
import time

from harness import WORK, command, curated_base, write_results

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
VARIANTS = {"full": None, "lora-attention": ATTENTION,
            "lora-all-linear": ATTENTION + ["gate_proj", "up_proj", "down_proj"]}
WARMUP = 2


def batches(spec, splits, tokenizer, chat, micro: int, steps: int) -> list[dict]:
    from distill_compiler.data.records import read_jsonl
    from distill_compiler.students.causal.data import conversation

    records = list(read_jsonl(splits / "train.jsonl"))[:micro * (steps + WARMUP)]
    texts = [chat.render(conversation(r, spec, chat)) for r in records]
    return [tokenizer(texts[i:i + micro], return_tensors="pt", padding=True)
            for i in range(0, len(texts), micro)]


def time_variant(base_model, targets, batches: list[dict]) -> dict:
    import copy

    import torch

    model = copy.deepcopy(base_model)
    if targets is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    seconds, tokens = [], []
    for batch in batches:
        started = time.perf_counter()
        logits = model(**batch, logits_to_keep=64).logits.float()
        torch.log_softmax(logits, -1)[..., 0].mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        tokens.append(int(batch["attention_mask"].sum()))
    seconds, tokens = seconds[WARMUP:], tokens[WARMUP:]
    return {"seconds_per_step": round(sum(seconds) / len(seconds), 2),
            "tokens_per_second": round(sum(tokens) / sum(seconds), 1),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main(argv: list[str] | None = None) -> None:
    import torch


    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--micro", type=int, default=2, help="conversations per step")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    compiled, base, chat = curated_base(args.spec)
    spec = compiled.spec
    data = batches(spec, compiled.artifacts["curate"], base.tokenizer, chat, args.micro, args.steps)
    results = {"command": command("train_speed.py", argv), "base": spec.student.base,
               "micro_batch": args.micro, "timed_steps": len(data) - WARMUP,
               "mean_tokens_per_step": round(sum(int(b["attention_mask"].sum()) for b in data)
                                             / len(data)),
               "variants": {name: time_variant(base.model, targets, data)
                            for name, targets in VARIANTS.items()}}
    out = WORK / "train_speed"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)


if __name__ == "__main__":
    main()
