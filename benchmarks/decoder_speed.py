"""Decode speed of a compiled decoder student, every variant side by side in one run.

    python benchmarks/decoder_speed.py examples/support-agent/spec.yaml [--prompts 8] [--tokens 48]

Compiles the spec (cached stages are reused), then answers the same test prompts, with the
runtime's constraint, through: PyTorch eager (the trained checkpoint), ONNX fp32, ONNX int8 and
ONNX int4 (quantized here from the fp32 graph when the bundle ships another). Each variant runs
in its own process, so its peak resident memory is its own. The shipped variant also runs
without the system turn's KV cache (warm), which is what time to first token gains from it.

Prints (and writes to <workdir>/decoder_speed.json): per variant, decode tokens/s (tokens after
the first over the time after the first), time to first token p50, peak RSS, model file size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import WORK, command, compile_spec, write_results

VARIANTS = ("torch", "onnx-fp32", "onnx-int8", "onnx-int4", "onnx-shipped-cold")


def test_prompts(spec, splits: Path, chat, n: int) -> list[tuple[str, object]]:
    """(rendered prompt, decoding mode) for the first `n` test points."""
    from distill_compiler.data.records import read_jsonl
    from distill_compiler.runtime.decoder import Agent, Extract
    from distill_compiler.students.causal.data import points

    out = []
    for record in read_jsonl(splits / "test.jsonl"):
        for p in points(record, spec, chat):
            mode = Extract(spec.output.schema_) if spec.task == "extract" else Agent(p.tools)
            out.append((chat.render(p.prompt, add_generation_prompt=True), mode))
    return out[:n]


def decoder_for(variant: str, export: Path, model_dir: Path):
    from distill_compiler.runtime.decoder import Decoder
    from distill_compiler.students.causal.validate import TorchGraph

    if variant == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(2)
        onnx = Decoder(export, model="model.fp32.onnx")  # spec, tokenizer, chat: the bundle's
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return Decoder.over(TorchGraph(model), onnx.spec, onnx.tokenizer, onnx.chat)
    files = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx",
             "onnx-int4": "model.int4.onnx", "onnx-shipped-cold": "model.onnx"}
    return Decoder(export, model=str(quantized(export, files[variant])))


def quantized(export: Path, name: str) -> Path:
    """The graph for a variant: shipped and fp32 as exported, int8/int4 made here from fp32
    (into the benchmark's work folder) unless the bundle already ships that kind."""
    from distill_compiler.students.quantize import quantize

    if name in ("model.onnx", "model.fp32.onnx"):
        return export / name
    kind = name.split(".")[1]
    parity = json.loads((export / "parity.json").read_text())
    if parity["quantize"] == kind:
        return export / "model.onnx"
    out = WORK / "decoder_speed" / export.name / name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize(export / "model.fp32.onnx", out, kind)
    return out


def run_variant(args) -> dict:
    """In a child process: decode every prompt, report speed and this process's peak RSS."""
    from distill_compiler.runtime.causal import CausalPolicy
    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.spec import load_spec

    spec = load_spec(args.spec)
    export, model_dir = Path(args.export), Path(args.model)
    chat = ChatFormat.from_dict(json.loads((export / "chat.json").read_text()))
    decoder = decoder_for(args.child, export, model_dir)
    if args.child not in ("torch", "onnx-shipped-cold"):  # torch caches mutate in place
        policy = CausalPolicy(json.loads((Path(args.bundle) / "policy.json").read_text()))
        decoder.warm(policy.shared_prefix())
    prompts = test_prompts(spec, Path(args.splits), chat, args.prompts)
    decoder.complete(*prompts[0], max_new_tokens=4)  # first-call allocations out of the figures
    rates, first = [], []
    for prompt, mode in prompts:
        c = decoder.complete(prompt, mode, args.tokens)
        if c.new_tokens > 1:
            rates.append((c.new_tokens - 1) / (c.seconds - c.first_token_seconds))
        first.append(1000 * c.first_token_seconds)
    return {"decode_tokens_per_second": round(statistics.median(rates), 1) if rates else None,
            "first_token_ms_p50": round(statistics.median(first), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "prompts": len(prompts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    for name in ("export", "model", "splits", "bundle"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        json.dump(run_variant(args), sys.stdout)
        return

    compiled = compile_spec(args.spec)
    paths = {"export": compiled.artifacts["export"], "model": compiled.artifacts["train"] / "model",
             "splits": compiled.artifacts["curate"], "bundle": compiled.project.bundle_dir}
    results = {"command": command("decoder_speed.py", argv), "spec": str(args.spec),
               "student_base": compiled.spec.student.base, "variants": {}}
    for variant in VARIANTS:
        started = time.perf_counter()
        child = [sys.executable, __file__, str(args.spec), "--child", variant,
                 "--prompts", str(args.prompts), "--tokens", str(args.tokens),
                 *(f"--{k}={v}" for k, v in paths.items())]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        results["variants"][variant] = {**figures, "seconds": round(time.perf_counter() - started, 1)}
        print(variant, figures, file=sys.stderr)
    sizes = {"onnx-fp32": "model.fp32.onnx", "onnx-shipped-cold": "model.onnx"}
    for variant, name in sizes.items():
        results["variants"][variant]["file_mb"] = round((paths["export"] / name).stat().st_size / 1e6, 1)
    out = WORK / "decoder_speed"
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, results)


if __name__ == "__main__":
    main()
