"""Keep third-party chatter out of `distill compile` output.

transformers prints load reports and progress bars, torch.onnx warns about experimental
exporter internals, and onnxruntime's quantizer logs a pre-processing tip through the root
logger. None of it is actionable for a spec author; the stage's own progress says what
happens. `distill --debug` leaves everything as is.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager


def quiet_enabled() -> bool:
    return os.environ.get("DISTILL_DEBUG") != "1"


def quiet_training_libraries() -> None:
    """Silence transformers' load reports and progress bars (process-wide, idempotent)."""
    if not quiet_enabled():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def quiet_export():
    """Around ONNX export and quantization: drop exporter warnings and the quantizer's tip."""
    if not quiet_enabled():
        yield
        return
    root, torch_log = logging.getLogger(), logging.getLogger("torch.onnx")
    levels = root.level, torch_log.level
    root.setLevel(logging.ERROR)
    torch_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        root.setLevel(levels[0])
        torch_log.setLevel(levels[1])
