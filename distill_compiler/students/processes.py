"""Multi-process training (`accelerate launch`, torchrun): which process this is, and waiting
for the others. Standard library until a barrier is needed, so the pipeline can ask cheaply."""

from __future__ import annotations

import os


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) when `accelerate launch` or torchrun started this process, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def wait_for_everyone() -> None:
    """A barrier across the launch's processes (gloo on CPU, NCCL on GPUs)."""
    from accelerate import PartialState  # torch loads only for a multi-process run

    PartialState().wait_for_everyone()
