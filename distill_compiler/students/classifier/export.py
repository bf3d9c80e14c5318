"""Export a trained encoder classifier to ONNX, quantize it, and gate on parity.

The graph is the student module itself (`students.PooledClassifier`: encoder, masked mean,
head) through `torch.onnx.export(dynamo=True)`, with dynamic batch and sequence axes and two
outputs: `logits`, and `pooled_embedding`, the vector the head reads, which the runtime's
out-of-scope detector scores (runtime/ood.py). Parity is measured the way the model ships: the runtime's own
`OnnxClassifier` (tokenizers + onnxruntime) on the validation split, against the torch model
on the same texts.

int8 is searched for (`quantize_search`): the first variant, in order of expected speed, that
meets `export.min_parity` ships, and parity.json records which one, its agreement and its
batch-1 latency on this machine, beside every variant tried.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.records import read_jsonl
from ...errors import StageError
from ...runtime.classifier import OnnxClassifier
from ...runtime.format import EMBEDDING_OUTPUT, LOGITS_OUTPUT, input_text
from ..quantize import quantize
from ..quiet import quiet_export, quiet_training_libraries
from .model import PooledClassifier
from .quantize_search import Search, Trial, search_int8
from .train import predict_logits

# The inputs an encoder classifier may take, in the order the graph lists them.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths, so the traced sample has batch 2 and seq > 1 and neither axis
# is specialised to a constant (torch.export specialises dims of size 0 and 1).
TRACE_TEXTS = ("hello there", "a somewhat longer sentence to trace the sequence axis with")
# Static int8 calibrates on this many training texts, spread over the split: enough for stable
# activation ranges, a few seconds of fp32 inference on MiniLM-L6.
CALIBRATION_EXAMPLES = 256
# Percentile calibration stacks every batch into one histogram input, so its batches share one
# shape: this many rows, padded to the longest text of the sample.
PERCENTILE_BATCH = 8
# Latency of the int8 variants, batch 1: rounds of this many calls each, the graphs taking
# turns so that a busy neighbour slows all of them alike.
LATENCY_ROUNDS, LATENCY_BLOCK = 5, 20


def input_names(tokenizer) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when this tokenizer produces them."""
    return [n for n in ENCODER_INPUTS if n in ("input_ids", "attention_mask")
            or n in tokenizer.model_input_names]


class WithEmbedding(torch.nn.Module):
    """The student with its pooled embedding as a second output: the head reads it anyway, so
    the detector costs the graph nothing."""

    def __init__(self, model: PooledClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        pooled = self.model.embed(input_ids, attention_mask, token_type_ids)
        return self.model.head(pooled), pooled


def export_fp32(model, tokenizer, path: Path) -> None:
    names = input_names(tokenizer)
    sample = tokenizer(list(TRACE_TEXTS), padding=True, return_tensors="pt")
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=model.encoder.config.max_position_embeddings)
    program = torch.onnx.export(
        WithEmbedding(model).eval(), tuple(sample[n] for n in names), dynamo=True, verbose=False,
        input_names=names, output_names=[LOGITS_OUTPUT, EMBEDDING_OUTPUT],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names})
    program.save(str(path), external_data=False)


def write_tokenizer(src: Path, dst: Path, max_length: int) -> None:
    """Copy tokenizer.json with truncation at the export length and padding off: the runtime
    pads each batch itself, to its longest member."""
    from tokenizers import Tokenizer

    if not src.is_file():
        raise StageError("export", f"the trained model has no tokenizer.json ({src})",
                         "the student's tokenizer must be a `tokenizers` fast tokenizer")
    tok = Tokenizer.from_file(str(src))
    tok.enable_truncation(max_length)
    tok.no_padding()
    tok.save(str(dst))


# --------------------------------------------------------------------------- parity

@dataclass
class Parity:
    n: int
    agreement_fp32: float
    agreement_shipped: float
    max_abs_diff_fp32: float


def measure_parity(reference: np.ndarray, fp32: np.ndarray, shipped: np.ndarray) -> Parity:
    """Argmax agreement of each ONNX model with the torch logits, and the fp32 logit gap."""
    ref = reference.argmax(-1)
    return Parity(len(ref), float((fp32.argmax(-1) == ref).mean()),
                  float((shipped.argmax(-1) == ref).mean()),
                  float(np.abs(fp32 - reference).max()))


def under(value: float, gate: float) -> str:
    """`value` as a percentage with the digits it takes to read as under `gate`: 98.97%, not
    a 99.0% that looks like it meets a 99.0% gate."""
    digits = 1
    while digits < 3 and round(value * 100, digits) >= round(gate * 100, digits):
        digits += 1
    return f"{value:.{digits}%}"


def check_parity(parity: Parity, quantize_kind: str, min_parity: float,
                 tried: Sequence[dict] = ()) -> None:
    """Fail the stage when the shipped model strays from the trained one too often; `tried`:
    the int8 variants the search measured, named in the message."""
    if parity.agreement_shipped >= min_parity:
        return
    what = "the fp32 export" if quantize_kind == "none" else quantize_kind
    if quantize_kind == "none":
        hint = ("the unquantized graph should match the trained model; a gap this large points "
                "at the export itself: please report it")
    else:
        hint = (f"use export.quantize: none (or int8 rather than int4), or train longer so "
                f"classes are further apart; export.min_parity is {min_parity}")
    raise StageError("export",
                     f"{what} agrees with the trained model on "
                     f"{under(parity.agreement_shipped, min_parity)} of {parity.n} validation "
                     f"examples (< {min_parity:.1%})"
                     + ("; variants tried: " + ", ".join(
                         f"{t['variant']} {under(t['agreement'], min_parity)}" for t in tried)
                        if tried else ""), hint)


# --------------------------------------------------------------------------- int8 search

def encode_feed(classifier: OnnxClassifier, encodings: list, width: int) -> dict:
    """The graph's inputs for `encodings`, padded to `width`."""
    ids = np.full((len(encodings), width), classifier.pad_id, dtype=np.int64)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {name: arrays[name].astype(dtype) for name, dtype in classifier.feeds.items()}


def calibration_feeds(classifier: OnnxClassifier, texts: list[str], method: str):
    """Static int8's calibration inputs: one unpadded text at a time for MinMax (padding would
    show it positions the runtime never computes at batch 1); fixed-shape batches for
    Percentile, whose histograms need one shape."""
    step = max(1, len(texts) // CALIBRATION_EXAMPLES)
    encodings = classifier.tokenizer.encode_batch(texts[::step][:CALIBRATION_EXAMPLES])
    if method == "minmax":
        return (encode_feed(classifier, [e], len(e.ids)) for e in encodings)
    width = max(len(e.ids) for e in encodings)
    rows = len(encodings) - len(encodings) % PERCENTILE_BATCH or len(encodings)
    return (encode_feed(classifier, encodings[i:i + PERCENTILE_BATCH], width)
            for i in range(0, rows, PERCENTILE_BATCH))


def latency_side_by_side(paths: Sequence[Path], tokenizer: Path, max_length: int,
                         texts: list[str]) -> list[float]:
    """Batch-1 p50 ms (tokenizer + model, as the runtime serves) of each graph, in turns."""
    runners = [OnnxClassifier(p, tokenizer, max_length) for p in paths]
    samples: list[list[float]] = [[] for _ in runners]
    for runner in runners:  # warm-up: first runs allocate and pick kernels
        runner.logits(texts[:LATENCY_BLOCK])
    for _ in range(LATENCY_ROUNDS):
        for runner, times in zip(runners, samples):
            for i in range(LATENCY_BLOCK):
                start = time.perf_counter()
                runner.logits([texts[i % len(texts)]])
                times.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in samples]


def search_classifier_int8(fp32: Path, shipped: Path, out: Path, export, val: list[str],
                           train: list[str], reference: np.ndarray, reporter) -> dict:
    """Run the int8 search, copy the variant that ships (the best one when none meets the
    gate) to `shipped`, and return parity.json's `int8` record."""
    tokenizer = out / "tokenizer.json"
    fp32_runner = OnnxClassifier(fp32, tokenizer, export.max_length)
    with tempfile.TemporaryDirectory(prefix="distill-int8-") as workdir:
        search = Search(
            fp32, Path(workdir), reference.argmax(-1),
            lambda path, n: OnnxClassifier(path, tokenizer, export.max_length).logits(val[:n]),
            lambda paths: latency_side_by_side(paths, tokenizer, export.max_length, val),
            lambda method: calibration_feeds(fp32_runner, train or val, method),
            export.min_parity, reporter.log)
        chosen: Trial | None = search_int8(search, export.int8_mode)
        best = chosen or max(search.tried, key=lambda t: t.agreement)
        shutil.copyfile(best.path, shipped)
    if chosen:
        reporter.log(f"export: shipping int8 {chosen.variant.name} "
                     f"({chosen.agreement:.1%}, {chosen.latency_ms:.2f} ms p50 at batch 1)")
    return {"mode": export.int8_mode, "variant": best.variant.name if chosen else None,
            "latency_p50_ms": None if best.latency_ms is None else round(best.latency_ms, 3),
            "fp32_latency_p50_ms": (None if search.fp32_latency_ms is None
                                    else round(search.fp32_latency_ms, 3)),
            "fp32_matmuls": list(best.variant.keep_fp32),
            "tried": [t.record() for t in search.tried]}


# --------------------------------------------------------------------------- stage body

def export_classifier(train_dir: Path, splits_dir: Path, out: Path, export, text_field: str | None,
                      reporter) -> dict:
    """Write model.onnx (+ model.fp32.onnx when quantized), tokenizer.json, labels.json and
    parity.json into `out`; return the stage summary."""
    started = time.perf_counter()
    val = [input_text(r["input"], text_field) for r in read_jsonl(splits_dir / "val.jsonl")]
    if not val:
        raise StageError("export", "the validation split is empty, so parity cannot be checked",
                         "give curate more examples (data.holdout sets the validation share)")
    quiet_training_libraries()
    model, tokenizer = PooledClassifier.load(train_dir / "model")

    shipped = out / "model.onnx"
    fp32 = shipped if export.quantize == "none" else out / "model.fp32.onnx"
    reporter.log(f"export: tracing to ONNX ({', '.join(input_names(tokenizer))} -> "
                 f"{LOGITS_OUTPUT}, {EMBEDDING_OUTPUT})")
    with quiet_export():
        export_fp32(model, tokenizer, fp32)
        if export.quantize == "int4":
            reporter.log("export: quantizing weights to int4")
            quantize(fp32, shipped, "int4")
    write_tokenizer(train_dir / "model" / "tokenizer.json", out / "tokenizer.json", export.max_length)
    shutil.copyfile(train_dir / "labels.json", out / "labels.json")

    reporter.log(f"export: checking parity on {len(val)} validation examples")
    reference = predict_logits(model, tokenizer, val, export.max_length).numpy()
    int8 = None
    if export.quantize == "int8":
        train = [input_text(r["input"], text_field) for r in read_jsonl(splits_dir / "train.jsonl")]
        int8 = search_classifier_int8(fp32, shipped, out, export, val, train, reference, reporter)
    fp32_logits = OnnxClassifier(fp32, out / "tokenizer.json", export.max_length).logits(val)
    shipped_logits = (fp32_logits if shipped == fp32 else
                      OnnxClassifier(shipped, out / "tokenizer.json", export.max_length).logits(val))
    parity = measure_parity(reference, fp32_logits, shipped_logits)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".json")}
    (out / "parity.json").write_text(json.dumps(
        {"quantize": export.quantize, **vars(parity), "sizes": sizes,
         **({"int8": int8} if int8 else {}),
         "seconds": round(time.perf_counter() - started, 2)}, indent=2))
    check_parity(parity, export.quantize, export.min_parity, int8["tried"] if int8 else ())
    return {"quantize": export.quantize, "agreement": round(parity.agreement_shipped, 4),
            "size_mb": round(sizes["model.onnx"] / 1e6, 2),
            **({"int8_variant": int8["variant"], "latency_p50_ms": int8["latency_p50_ms"]}
               if int8 else {})}
