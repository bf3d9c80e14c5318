"""Export a trained encoder classifier to ONNX, quantize it, and gate on parity.

The graph is the student module itself (`students.PooledClassifier`: encoder, masked mean,
head) through `torch.onnx.export(dynamo=True)`, with dynamic batch and sequence axes and two
outputs: `logits`, and `pooled_embedding`, the vector the head reads, which the runtime's
out-of-scope detector scores (runtime/ood.py). Parity is measured the way the model ships: the runtime's own
`OnnxClassifier` (tokenizers + onnxruntime) on the validation split, against the torch model
on the same texts.
"""

from __future__ import annotations

import json
import shutil
import time
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
from .train import predict_logits

# The inputs an encoder classifier may take, in the order the graph lists them.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths, so the traced sample has batch 2 and seq > 1 and neither axis
# is specialised to a constant (torch.export specialises dims of size 0 and 1).
TRACE_TEXTS = ("hello there", "a somewhat longer sentence to trace the sequence axis with")


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


def check_parity(parity: Parity, quantize_kind: str, min_parity: float) -> None:
    """Fail the stage when the shipped model strays from the trained one too often."""
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
                     f"{what} agrees with the trained model on {parity.agreement_shipped:.1%} of "
                     f"{parity.n} validation examples (< {min_parity:.1%})", hint)


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
        if export.quantize != "none":
            reporter.log(f"export: quantizing weights to {export.quantize}")
            # Full-range int8 weights, as banking77 was measured with (benchmarks/RESULTS.md);
            # the decoder export uses reduce_range (see quantize.py).
            quantize(fp32, shipped, export.quantize, reduce_range=False)
    write_tokenizer(train_dir / "model" / "tokenizer.json", out / "tokenizer.json", export.max_length)
    shutil.copyfile(train_dir / "labels.json", out / "labels.json")

    reporter.log(f"export: checking parity on {len(val)} validation examples")
    reference = predict_logits(model, tokenizer, val, export.max_length).numpy()
    fp32_logits = OnnxClassifier(fp32, out / "tokenizer.json", export.max_length).logits(val)
    shipped_logits = (fp32_logits if shipped == fp32 else
                      OnnxClassifier(shipped, out / "tokenizer.json", export.max_length).logits(val))
    parity = measure_parity(reference, fp32_logits, shipped_logits)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.suffix in (".onnx", ".json")}
    (out / "parity.json").write_text(json.dumps(
        {"quantize": export.quantize, **vars(parity), "sizes": sizes,
         "seconds": round(time.perf_counter() - started, 2)}, indent=2))
    check_parity(parity, export.quantize, export.min_parity)
    return {"quantize": export.quantize, "agreement": round(parity.agreement_shipped, 4),
            "size_mb": round(sizes["model.onnx"] / 1e6, 2)}
