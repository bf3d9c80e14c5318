"""Distill the student from the curated teacher examples."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "checkpoint"
KEYED_ON = ("task", "input", "student")  # input: which field the model reads
INPUTS = ("curate",)


def run(ctx) -> dict:
    if ctx.spec.task != "classify":
        raise StageError("train", f"training for task {ctx.spec.task} is not built yet",
                         "see the open issues; classify works today")
    from ..runtime import text_field_of
    from ..train_classifier import train_classifier  # torch loads only when a model trains

    return train_classifier(ctx.inputs["curate"].path, ctx.out, ctx.spec.student,
                            text_field_of(ctx.spec.input.schema_), ctx.spec_dir, ctx.reporter)
