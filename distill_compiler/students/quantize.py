"""Weight quantization of exported ONNX graphs, shared by the classifier and decoder exports.

Both keep the output head (the MatMul that computes `logits`) in fp32. Dynamic int8 rounds the
head's *input* to 256 levels per call, right where a rounding error becomes a different answer:
on a scratch 2x64 agent decoder, int8 with the head quantized reproduced 0 of 24 validation
answers token for token, and 24 of 24 with the head in fp32 (measured side by side in one run).

int8 also uses reduce_range (7-bit weights): on x86 CPUs without VNNI, onnxruntime's u8s8
kernels add pairs of products in 16 bits, which saturates with full-range weights; the same
decoder reproduced 21 of 24 answers without it and 24 of 24 with it.
"""

from __future__ import annotations

from pathlib import Path

INT4_BLOCK = 32  # MatMulNBits block size: 32 keeps small hidden sizes quantizable


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


def quantize(fp32: Path, out: Path, kind: str, output: str | None = None,
             reduce_range: bool = True) -> None:
    """Weight-quantize `fp32` into the single file `out`, leaving the head of `output` in fp32:
    int8 dynamic per channel, or int4 MatMulNBits (embedding Gathers become
    GatherBlockQuantized)."""
    head = head_nodes(fp32, output)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=reduce_range, nodes_to_exclude=head)
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
