"""Export the student to ONNX, quantize it, and check parity with the trained model."""

from __future__ import annotations

VERSION = "1"
KIND = "onnx"
# input: which field the parity texts come from; description, output and tools: the system
# turn of the extract/agent parity prompts.
KEYED_ON = ("task", "description", "input", "output", "tools", "export")
INPUTS = ("train", "curate")


def run(ctx) -> dict:
    if ctx.spec.task in ("extract", "agent"):
        from ..export_causal import export_causal  # torch and onnxruntime load only here

        return export_causal(ctx.inputs["train"].path, ctx.inputs["curate"].path, ctx.out,
                             ctx.spec, ctx.reporter)
    from ..export_classifier import export_classifier
    from ..runtime import text_field_of

    return export_classifier(ctx.inputs["train"].path, ctx.inputs["curate"].path, ctx.out,
                             ctx.spec.export, text_field_of(ctx.spec.input.schema_), ctx.reporter)
