"""Check the gates and assemble the edge bundle."""

from __future__ import annotations

from ..errors import StageError

VERSION = "1"
KIND = "bundle"
KEYED_ON = ("name", "task", "description", "input", "output", "intents", "tools", "scenarios",
            "refusals", "escalation", "teacher", "data", "student", "export", "gates")
INPUTS = ("curate", "train", "export", "evaluate")


def run(ctx) -> dict:
    raise StageError("bundle", "this stage is not built yet", "see the open issues")
