"""Export the student to ONNX, quantize it, and check parity with the trained model."""

from __future__ import annotations

VERSION = "4"  # 2: the classifier graph outputs the pooled embedding too; 3: int8 is searched for
# (quantize_search), parity.json records the variant; 4: and fp32's latency beside it
KIND = "onnx"
# input: which field the parity texts come from; description, output and tools: the system
# turn of the extract/agent parity prompts.
KEYED_ON = ("task", "description", "input", "output", "tools", "export")
INPUTS = ("train", "curate")


def run(ctx) -> dict:
    train, splits = ctx.inputs["train"].path, ctx.inputs["curate"].path
    if ctx.spec.task == "classify":
        from ..runtime.format import text_field_of
        from ..students.classifier.export import (
            export_classifier,  # torch loads only here
        )

        return export_classifier(train, splits, ctx.out, ctx.spec.export,
                                 text_field_of(ctx.spec.input.schema_), ctx.reporter)
    from ..students.causal.export import export_causal  # torch loads only here

    return export_causal(train, splits, ctx.out, ctx.spec, ctx.reporter)
