"""Export a trained encoder classifier to ONNX, quantize it, and gate on parity.

The graph is the student module itself (`students.PooledClassifier`: encoder, masked mean,
head) through `torch.onnx.export(dynamo=True)`, with dynamic batch and sequence axes and a
single output, `logits`. Parity is measured the way the model ships: the runtime's own
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

from .errors import StageError
from .library_noise import quiet_export, quiet_training_libraries
from .records import read_jsonl
from .runtime import OnnxClassifier, input_text
from .students import PooledClassifier
from .train_classifier import predict_logits

# The inputs an encoder classifier may take, in the order the graph lists them.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Texts of different lengths, so the traced sample has batch 2 and seq > 1 and neither axis
# is specialised to a constant (torch.export specialises dims of size 0 and 1).
TRACE_TEXTS = ("hello there", "a somewhat longer sentence to trace the sequence axis with")
INT4_BLOCK = 32


def input_names(tokenizer) -> list[str]:
    """input_ids, attention_mask, and token_type_ids when this tokenizer produces them."""
    return [n for n in ENCODER_INPUTS if n in ("input_ids", "attention_mask")
            or n in tokenizer.model_input_names]


def export_fp32(model, tokenizer, path: Path) -> None:
    names = input_names(tokenizer)
    sample = tokenizer(list(TRACE_TEXTS), padding=True, return_tensors="pt")
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=model.encoder.config.max_position_embeddings)
    program = torch.onnx.export(
        model.eval(), tuple(sample[n] for n in names), dynamo=True, verbose=False,
        input_names=names, output_names=["logits"],
        dynamic_shapes={n: {0: batch, 1: seq} for n in names})
    program.save(str(path), external_data=False)


def quantize(fp32: Path, out: Path, kind: str) -> None:
    """Weight-quantize `fp32` into `out`: int8 dynamic (per channel) or int4 MatMulNBits, the
    classifier head left in fp32 either way.

    The head is a few thousand weights, but int8 would also round its input, the pooled
    sentence vector, to 256 levels per batch, right where a rounding error becomes a different
    answer. Measured on harbor-support (716 texts) it matters little, since the encoder's
    rounding dominates: mean logit error 0.335 -> 0.332, argmax parity 100% either way, +7 KB.
    """
    head = head_nodes(fp32)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Per-channel scales track each output neuron's range; on MiniLM they kept argmax
        # parity at least as well as per-tensor at the same size.
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=head)
    elif kind == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=INT4_BLOCK, is_symmetric=True,
                                 accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"),
                                 nodes_to_exclude=head)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
    else:
        raise ValueError(f"unknown quantization {kind!r}")


def head_nodes(path: Path) -> list[str]:
    """`nodes_to_exclude` for the MatMul/Gemm that computes `logits` (found by walking back from
    the graph's output through bias adds and the like)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type not in ("MatMul", "Gemm"):
        node = producer.get(node.input[0]) if node.input else None
    if node is None:
        return []
    # quantize_dynamic first rewrites a Gemm with bias into MatMul + Add, naming the MatMul
    # `<gemm>_MatMul`, and applies the exclusion list to that rewritten graph.
    return [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]


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
    reporter.log(f"export: tracing to ONNX ({', '.join(input_names(tokenizer))} -> logits)")
    with quiet_export():
        export_fp32(model, tokenizer, fp32)
        if export.quantize != "none":
            reporter.log(f"export: quantizing weights to {export.quantize}")
            quantize(fp32, shipped, export.quantize)
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
