"""Keep third-party chatter out of `distill compile` output.

transformers prints load reports and progress bars, torch.onnx warns about experimental
exporter internals, and onnxruntime's quantizer logs a pre-processing tip through the root
logger. None of it is actionable for a spec author; the stage's own progress says what
happens. `distill --debug` leaves everything as is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings


def quiet_enabled() -> bool:
    return os.environ.get("DISTILL_DEBUG") != "1"


def quiet_training_libraries() -> None:
    """Silence transformers' load reports and progress bars (process-wide, idempotent)."""
    if not quiet_enabled():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # peft and TRL still call transformers' deprecated checkpointing query on every wrap.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


@contextlib.contextmanager
def quiet_progress_bars():
    """Around code that draws plain tqdm bars transformers' switch does not reach (the GGUF
    loader's conversion bar). tqdm reads TQDM_DISABLE only when it is imported, so the bar's
    stream is redirected instead; exceptions still propagate."""
    if not quiet_enabled():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def quiet_export():
    """Around ONNX export and quantization: drop exporter warnings and the quantizer's tip."""
    if not quiet_enabled():
        yield
        return
    # torch.export logs each dynamic dimension it specialises; the exporter prints its passes
    # ("[torch.onnx] Run decompositions...") to stdout.
    loggers = [logging.getLogger(name) for name in ("", "torch.onnx", "torch._export",
                                                    "torch.export")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
