"""Validate, deduplicate, scrub PII and split the generated examples."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "splits"
KEYED_ON = ("task", "input", "output", "intents", "tools", "refusals", "data")
INPUTS = ("generate",)


def run(ctx) -> dict:
    raise StageError("curate", "this stage is not built yet", "see the open issues")
