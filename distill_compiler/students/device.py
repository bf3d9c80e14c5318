"""Which torch device a student trains on (`student.device`), and mixed precision where it pays."""

from __future__ import annotations

import torch

from ..errors import StageError

# --------------------------------------------------------------------------- device

def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise StageError("train", "student.device is cuda but torch sees no GPU",
                         "use device: auto (falls back to CPU) or install a CUDA build of torch")
    if setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPU (weights stay fp32, so the checkpoint is fp32); off on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")
