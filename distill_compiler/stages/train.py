"""Distill the student from the curated teacher examples: an encoder classifier (classify) or a
causal LM (extract, agent)."""

from __future__ import annotations

VERSION = "3"
KIND = "checkpoint"
# input: the field a classifier reads; description, output and tools: the causal student's
# system turn (ChatFormat.system_text), so a change to any of them changes what it learns.
KEYED_ON = ("task", "description", "input", "output", "tools", "student")
INPUTS = ("curate",)


def run(ctx) -> dict:
    splits = ctx.inputs["curate"].path
    if ctx.spec.task == "classify":
        from ..runtime.format import text_field_of
        from ..students.classifier.train import (
            train_classifier,  # torch loads only here
        )

        return train_classifier(splits, ctx.out, ctx.spec.student,
                                text_field_of(ctx.spec.input.schema_), ctx.spec_dir, ctx.reporter)
    from ..students.causal.train import train_causal  # torch loads only here

    return train_causal(splits, ctx.out, ctx.spec, ctx.spec_dir, ctx.cache_root, ctx.reporter)
