"""Weight quantization of exported ONNX graphs, shared by the classifier and decoder exports.

Both keep the output head (the MatMul that computes `logits`) in fp32. Dynamic int8 rounds the
head's *input* to 256 levels per call, right where a rounding error becomes a different answer:
on a scratch 2x64 agent decoder, int8 with the head quantized reproduced 0 of 24 validation
answers token for token, and 24 of 24 with the head in fp32 (measured side by side in one run).

int8 also uses reduce_range (7-bit weights): on x86 CPUs without VNNI, onnxruntime's u8s8
kernels add pairs of products in 16 bits, which saturates with full-range weights; the same
decoder reproduced 21 of 24 answers without it and 24 of 24 with it.

Static int8 (`quantize_static_int8`) writes a QDQ graph whose activation scales were fixed on
calibration inputs, so the runtime does not re-measure every activation on every call as
dynamic int8 does. Blockwise int8 (`quantize_blockwise_int8`) quantizes weights and, at run
time, activations in blocks of 32 values rather than whole tensors. `weight_matmuls` lists the MatMuls either kind may quantize, the ones a
parity search can keep in fp32 one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

INT4_BLOCK = 32  # MatMulNBits block size: 32 keeps small hidden sizes quantizable
# Blockwise int8's block: on a 50-intent MiniLM-L6, 32 agreed with the trained model on 99.4 %
# of validation, 128 on 99.3 %, dynamic int8 on 98.6 % (one run, side by side).
INT8_BLOCK = 32


def head_nodes(path: Path, output: str | None = None) -> list[str]:
    """`nodes_to_exclude` for the MatMul/Gemm that computes the graph's `output` (default: its
    first), found by walking back through bias adds, casts and the like."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(output or graph.output[0].name)
    while node is not None and node.op_type not in ("MatMul", "Gemm"):
        node = producer.get(node.input[0]) if node.input else None
    if node is None:
        return []
    # quantize_dynamic first rewrites a Gemm with bias into MatMul + Add, naming the MatMul
    # `<gemm>_MatMul`, and applies the exclusion list to that rewritten graph.
    return [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]


def weight_matmuls(path: Path, output: str | None = None) -> list[str]:
    """The MatMuls of `path` that multiply by a stored weight, in graph order, the head of
    `output` left out: the nodes int8 quantizes (attention's activation-by-activation MatMuls
    have no weight to store in int8)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    head = set(head_nodes(path, output))
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in head
            and any(i in weights for i in n.input)]


def quantize(fp32: Path, out: Path, kind: str, output: str | None = None,
             reduce_range: bool = True, keep_fp32: Sequence[str] = (),
             only: Sequence[str] | None = None) -> None:
    """Weight-quantize `fp32` into the single file `out`, leaving the head of `output` and the
    nodes in `keep_fp32` in fp32 (`only`: quantize just these nodes): int8 dynamic per channel,
    or int4 MatMulNBits (embedding Gathers become GatherBlockQuantized)."""
    head = head_nodes(fp32, output) + list(keep_fp32)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, nodes_to_exclude=head,
                         nodes_to_quantize=list(only) if only is not None else None)
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


def quantize_static_int8(fp32: Path, out: Path, feeds: Iterable[dict], method: str,
                         cache: Path, output: str | None = None, keep_fp32: Sequence[str] = (),
                         only: Sequence[str] | None = None) -> None:
    """Static QDQ int8 of the weight MatMuls of `fp32` into `out`: int8 weights per channel and
    int8 activations whose ranges come from running `feeds` (input name -> array) through the
    graph, by `method` (minmax | percentile). The head of `output` and `keep_fp32` stay fp32.

    The ranges are saved to `cache` the first time and read back after, so trying other nodes
    to keep in fp32 does not calibrate again."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, rows: Iterable[dict]):
            self.rows = iter(rows)

        def get_next(self) -> dict | None:
            return next(self.rows, None)

    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    # Only weight MatMuls: the embedding Gathers, LayerNorms and attention's own MatMuls stay
    # float, where rounding them costs accuracy and saves little time at these sizes.
    nodes = [n for n in (only if only is not None else weight_matmuls(fp32, output))
             if n not in set(keep_fp32)]
    quantize_static(str(fp32), str(out), None if cache.is_file() else Reader(feeds),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                    calibrate_method=calibrate[method], calibration_cache_path=cache,
                    extra_options={"CalibMovingAverage": False})


def quantize_blockwise_int8(fp32: Path, out: Path, output: str | None = None,
                            keep_fp32: Sequence[str] = (), only: Sequence[str] | None = None) -> None:
    """int8 weights in blocks of INT8_BLOCK along each MatMul's input axis (MatMulNBits, 8 bits),
    whose activations are quantized per block at run time (accuracy_level 4): a block's scale
    follows its own range where dynamic int8 has one scale per tensor, so a near-tie answer
    flips less often. The embedding Gathers are dynamic int8 (GatherBlockQuantized takes 4 bits
    only); the head of `output` and `keep_fp32` stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    gathers = out.with_name(out.stem + ".gather.onnx")
    quantize_dynamic(str(fp32), str(gathers), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Gather"])
    q = MatMulNBitsQuantizer(onnx.load(str(gathers)), bits=8, block_size=INT8_BLOCK,
                             is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",),
                             nodes_to_exclude=head_nodes(fp32, output) + list(keep_fp32),
                             nodes_to_include=list(only) if only is not None else None)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    gathers.unlink()
