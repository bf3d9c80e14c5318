"""Export the student to ONNX, quantize it, and check parity with the trained model."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "onnx"
KEYED_ON = ("task", "input", "export")  # input: which field the parity texts come from
INPUTS = ("train", "curate")


def run(ctx) -> dict:
    if ctx.spec.task != "classify":
        raise StageError("export", f"export for task {ctx.spec.task} is not built yet",
                         "see the open issues; classify works today")
    from ..export_classifier import export_classifier  # torch and onnxruntime load only here
    from ..runtime import text_field_of

    return export_classifier(ctx.inputs["train"].path, ctx.inputs["curate"].path, ctx.out,
                             ctx.spec.export, text_field_of(ctx.spec.input.schema_), ctx.reporter)
