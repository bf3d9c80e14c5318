"""Ask the teacher for training data, or replay its recorded logs."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "examples"
KEYED_ON = ("task", "description", "input", "output", "intents", "tools", "scenarios", "refusals", "teacher", "data")
INPUTS = ()


def run(ctx) -> dict:
    raise StageError("generate", "this stage is not built yet", "see the open issues")
