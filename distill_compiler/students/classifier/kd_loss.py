"""The classification distillation loss, and the soft targets it is fed, as pure functions.

    loss = alpha * T^2 * KL(p_T || softmax(z / T)) + (1 - alpha) * CE(z, y)

z are the student's logits, y the teacher's labels, p the teacher's distribution over the
label set and p_T that distribution at temperature T (p^(1/T), renormalised: the same
softening Hinton et al. apply to teacher logits, since log p is the teacher's logit up to a
constant). The T^2 factor keeps the KD gradient on the scale of the CE one as T changes.
`method: ce` is alpha = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, soft: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """Mean KD + CE loss over a batch.

    logits: (batch, classes) student logits; targets: (batch,) teacher label indices;
    soft: (batch, classes) teacher probabilities, each row summing to 1 (see `soft_targets`).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ce = F.cross_entropy(logits, targets)
    if alpha == 0.0:
        return ce
    teacher = soften(soft, temperature)
    student_log_probs = F.log_softmax(logits / temperature, dim=-1)
    # kl_div uses xlogy, so teacher zeros (labels the teacher never gave) contribute nothing.
    kl = F.kl_div(student_log_probs, teacher, reduction="batchmean")
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution p at temperature T: p^(1/T), renormalised per row; zeros stay zero."""
    if temperature == 1.0:
        return probs
    powered = probs.clamp_min(0).pow(1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


def soft_targets(soft: Sequence[Mapping[str, float] | None], targets: Sequence[str],
                 labels: Sequence[str]) -> list[list[float]]:
    """Teacher distributions as rows over `labels`, in label order.

    Each record's "soft" dict is restricted to the label set and renormalised; labels it does
    not mention get 0. A record without soft labels (teacher.soft_labels: none, replayed logs
    without logprobs), or whose mass lies wholly outside the label set, falls back to the
    one-hot of its target, so its KD term pulls the same way as its CE term.
    """
    index = {label: i for i, label in enumerate(labels)}
    rows = []
    for dist, target in zip(soft, targets, strict=True):
        row = [0.0] * len(labels)
        for label, p in (dist or {}).items():
            if label in index and p > 0:
                row[index[label]] = float(p)
        total = sum(row)
        if total > 0:
            row = [p / total for p in row]
        else:
            row[index[target]] = 1.0
        rows.append(row)
    return rows
