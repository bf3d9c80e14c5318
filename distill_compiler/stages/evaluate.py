"""Measure the shipped model against the teacher and fit the cascade policy."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "evaluation"
KEYED_ON = ("task", "input", "intents", "refusals", "escalation", "export")
INPUTS = ("export", "curate", "generate")


def run(ctx) -> dict:
    raise StageError("evaluate", "this stage is not built yet", "see the open issues")
