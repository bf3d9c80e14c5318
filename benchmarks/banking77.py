"""Banking77 end to end: compile a spec whose teacher log is banking77's train.csv, then report
on its test.csv, which the compiler never sees.

    python benchmarks/banking77.py [--workdir DIR] [--set student.epochs=2 ...]

Prints (and writes to <workdir>/results.json): test accuracy of the fp32 and int8 students,
int8 parity, ECE before/after calibration, escalation rate and accepted accuracy at target
0.98, batch-1 latency p50/p99 at 32 tokens for PyTorch eager, ONNX fp32 and ONNX int8 measured
side by side in one run, and model sizes. With `--set student.layers=3` the full-depth model the
train stage keeps is exported the same way, and both int8 students are measured side by side
(test accuracy and latency), so the layer-dropped student is compared to L6 in one run. Data: ../shared/datasets/banking77 (CC BY 4.0,
PolyAI); read in place, never copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from harness import (
    DATASETS,
    WORK,
    command,
    compile_spec,
    cpu_line,
    replayed_classify_spec,
    write_results,
)
from harness import write_spec as harness_write_spec

DATA = DATASETS / "banking77" / "banking_data"
TARGET_ACCURACY = 0.98


def label_name(category: str) -> str:
    """banking77 spells a few labels loosely (`Refund_not_showing_up`, `reverted_card_payment?`)."""
    return re.sub(r"[^a-z0-9_]", "", category.lower())


def write_spec(workdir: Path) -> Path:
    categories = json.loads((DATA / "categories.json").read_text())
    spec = replayed_classify_spec("banking77", [label_name(c) for c in categories],
                                  DATA / "train.csv", {"target_accuracy": TARGET_ACCURACY})
    return harness_write_spec(workdir, spec,
                              "benchmarks/banking77.py: banking77's train.csv replayed as the teacher log")


def read_test() -> tuple[list[str], list[str]]:
    with open(DATA / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [label_name(r["category"]) for r in rows]


def percentiles(samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    return {"p50_ms": round(statistics.median(ordered), 3),
            "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3)}


def latency_side_by_side(runners: dict, text: str, rounds: int = 10, block: int = 50,
                         warmup: int = 30) -> dict:
    """Batch-1 latency of each runner on the same input, measured in alternating blocks so
    that machine noise hits every runner alike. Blocks, not single calls: interleaving calls
    one by one lets one framework's spinning worker threads steal the cores from the next."""
    for fn in runners.values():
        for _ in range(warmup):
            fn(text)
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(block):
                started = time.perf_counter()
                fn(text)
                samples[name].append((time.perf_counter() - started) * 1000)
    return {name: percentiles(s) for name, s in samples.items()}


def text_of_tokens(tokenizer_path: Path, n_tokens: int) -> str:
    """A real test sentence repeated and cut to exactly `n_tokens` tokens (with specials)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_truncation()
    words = (read_test()[0][0] + " ") * 20
    ids = tok.encode(words).ids[1:n_tokens - 1]
    return tok.decode(ids)


def measure_latency(artifacts: dict, bundle_dir: Path, text: str, threads: int,
                    max_length: int, full_depth: Path | None) -> dict:
    """PyTorch eager, ONNX fp32 and ONNX int8 at batch 1 with the same number of threads, and
    the full-depth model's ONNX fp32 and int8 beside them when there is one."""
    import torch

    from distill_compiler.runtime.classifier import OnnxClassifier

    torch.set_num_threads(threads)
    exports = {"": artifacts["export"], **({"_full_depth": full_depth} if full_depth else {})}
    runners = {"pytorch_eager_fp32": torch_runner(artifacts["train"] / "model", max_length)}
    for suffix, export in exports.items():
        tokenizer = export / "tokenizer.json"
        fp32 = OnnxClassifier(export / "model.fp32.onnx", tokenizer, max_length, threads)
        int8 = OnnxClassifier(export / "model.onnx", tokenizer, max_length, threads)
        runners[f"onnx_fp32{suffix}"] = one_at_a_time(fp32)
        runners[f"onnx_int8{suffix}"] = one_at_a_time(int8)
    return latency_side_by_side(runners, text)


def one_at_a_time(classifier):
    return lambda text: classifier.logits([text])


def export_full_depth(artifacts: dict, spec, workdir: Path) -> Path | None:
    """With student.layers, the train artifact keeps the full-depth model it cut the student
    from: export and quantize it exactly as the export stage did the shipped one (once; a rerun
    reuses it), so the two are compared on the same footing."""
    from distill_compiler.pipeline import Reporter
    from distill_compiler.runtime.format import text_field_of
    from distill_compiler.students.classifier.export import export_classifier
    from distill_compiler.students.classifier.train import FULL_DEPTH

    full = artifacts["train"] / FULL_DEPTH
    if not full.is_dir():
        return None
    out = workdir / "full_depth_export" / artifacts["train"].name
    if not (out / "parity.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        export_classifier(full, artifacts["curate"], out, spec.export,
                          text_field_of(spec.input.schema_), Reporter())
    return out


def depth_comparison(full_depth: Path, texts: list[str], gold: list[str], int8_accuracy: float,
                     max_length: int, train_log: dict, latency: dict) -> dict:
    """The layer-dropped student against the full-depth one it was cut from, on test."""
    from distill_compiler.runtime.classifier import OnnxClassifier

    labels = json.loads((full_depth / "labels.json").read_text())
    full = OnnxClassifier(full_depth / "model.onnx", full_depth / "tokenizer.json", max_length)
    predicted = [labels[i] for i in full.logits(texts).argmax(-1)]
    full_accuracy = round(float(np.mean([p == g for p, g in zip(predicted, gold)])), 4)
    return {
        "layers": train_log.get("layers", {}).get("kept"), "of": train_log.get("layers", {}).get("of"),
        "val_agreement": {"full_depth": train_log.get("full_depth_val_agreement"),
                          "shipped": train_log.get("val_agreement")},
        "test_accuracy_int8": {"full_depth": full_accuracy, "shipped": int8_accuracy,
                               "difference_points": round(100 * (int8_accuracy - full_accuracy), 2)},
        "int8_variant_full_depth": json.loads((full_depth / "parity.json").read_text()).get(
            "int8", {}).get("variant"),
        "int8_speedup_vs_full_depth_int8": {
            k: {stat: round(v["onnx_int8_full_depth"][stat] / v["onnx_int8"][stat], 2)
                for stat in ("p50_ms", "p99_ms")} for k, v in latency.items()},
        "sizes_mb": {"full_depth_int8": round((full_depth / "model.onnx").stat().st_size / 1e6, 1)},
    }


def torch_runner(model_dir: Path, max_length: int):
    """The trained student in PyTorch eager mode, tokenising like the runtime does."""
    import torch

    from distill_compiler.students.classifier.model import PooledClassifier

    model, tokenizer = PooledClassifier.load(model_dir)

    def run(text: str):
        with torch.inference_mode():
            return model(**tokenizer([text], truncation=True, max_length=max_length,
                                     return_tensors="pt"))
    return run


def ece(logits: np.ndarray, gold_ids: np.ndarray, temperature: float) -> float:
    from distill_compiler.metrics.calibration import expected_calibration_error
    from distill_compiler.runtime.classifier import softmax

    probs = softmax(logits, temperature)
    correct = probs.argmax(-1) == gold_ids
    return round(float(expected_calibration_error(probs.max(-1), correct)), 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=WORK / "banking77")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="spec override, as for `distill compile --set`")
    args = parser.parse_args(argv)

    from distill_compiler import runtime
    from distill_compiler.runtime.classifier import OnnxClassifier

    compiled = compile_spec(write_spec(args.workdir), args.sets)
    project, artifacts = compiled.project, compiled.artifacts

    texts, gold = read_test()
    bundle = runtime.load_bundle(project.bundle_dir)
    answers = bundle.predict_batch([{"message": t} for t in texts])
    fp32 = OnnxClassifier(artifacts["export"] / "model.fp32.onnx",
                                  artifacts["export"] / "tokenizer.json", bundle.policy.max_length)
    fp32_logits = fp32.logits(texts)
    labels = bundle.labels
    fp32_pred = [labels[i] for i in fp32_logits.argmax(-1)]
    int8_logits = bundle.classifier.logits(texts)
    # The model's own answers: the bundle's labels also carry the out-of-scope detector's
    # flags, which every in-scope test query flagged would count as a miss of the model.
    int8_pred = [labels[i] for i in int8_logits.argmax(-1)]
    gold_ids = np.array([labels.index(g) for g in gold])
    accepted = [a["route"] == "student" for a in answers]
    accepted_correct = [a["label"] == g for a, g, ok in zip(answers, gold, accepted) if ok]

    full_depth = export_full_depth(artifacts, project.spec, args.workdir)
    text32 = text_of_tokens(artifacts["export"] / "tokenizer.json", 32)
    # Speed depends on the CPU's int8 instructions more than on anything else: each latency
    # carries the CPU it was measured on.
    cpu = cpu_line()
    latency = {f"threads={n}": {"cpu": cpu, **measure_latency(
        artifacts, project.bundle_dir, text32, n, bundle.policy.max_length, full_depth)}
        for n in (1, 2)}
    parity = json.loads((artifacts["export"] / "parity.json").read_text())

    results = {
        "command": command("banking77.py", argv),
        "train_rows": next(r.summary for r in compiled.runs if r.name == "curate").get("splits"),
        "test_rows": len(texts),
        "compile_seconds": compiled.seconds,
        "stages": compiled.stages(),
        "test_accuracy": {
            "fp32": round(float(np.mean([p == g for p, g in zip(fp32_pred, gold)])), 4),
            "int8": round(float(np.mean([p == g for p, g in zip(int8_pred, gold)])), 4),
        },
        # Every banking77 test query is in scope: what the detector flags here are false flags.
        "bundle_out_of_scope_rate": round(float(np.mean([a["route"] == "out_of_scope"
                                                         for a in answers])), 4),
        "int8_vs_fp32_agreement": round(float(np.mean([a == b for a, b in zip(int8_pred, fp32_pred)])), 4),
        "ece_test": {"before": ece(int8_logits, gold_ids, 1.0),
                     "after": ece(int8_logits, gold_ids, bundle.policy.temperature)},
        "cascade_test": {
            "target_accuracy": TARGET_ACCURACY,
            "threshold": bundle.policy.threshold,
            "escalation_rate": round(1 - float(np.mean(accepted)), 4),
            "accepted_accuracy": round(float(np.mean(accepted_correct)), 4) if accepted_correct else None,
        },
        "int8_variant": parity.get("int8"),
        "latency_batch1_32_tokens": latency,
        "int8_speedup_vs_fp32_p50": {
            k: round(v["onnx_fp32"]["p50_ms"] / v["onnx_int8"]["p50_ms"], 2) for k, v in latency.items()},
        "sizes_mb": {
            "pytorch_safetensors": round(sum(p.stat().st_size for p in (artifacts["train"] / "model").rglob("*.safetensors")) / 1e6, 1),
            "onnx_fp32": round((artifacts["export"] / "model.fp32.onnx").stat().st_size / 1e6, 1),
            "onnx_int8": round((project.bundle_dir / "model.onnx").stat().st_size / 1e6, 1),
        },
    }
    if full_depth:
        train_log = json.loads((artifacts["train"] / "train_log.json").read_text())
        results["layer_drop"] = depth_comparison(
            full_depth, texts, gold, results["test_accuracy"]["int8"], bundle.policy.max_length,
            train_log, latency)
    write_results(args.workdir, results)
    variant = (parity.get("int8") or {}).get("variant")
    for threads, runs in latency.items():
        print(f"{threads} on {cpu}: " + ", ".join(
            f"{name} {runs[name]['p50_ms']:.2f}/{runs[name]['p99_ms']:.2f} ms p50/p99"
            for name in runs if name != "cpu")
            + f" (int8 variant {variant})")


if __name__ == "__main__":
    main()
