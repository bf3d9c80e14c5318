import math

import pytest
import torch
import torch.nn.functional as F

from distill_compiler.students.classifier.kd_loss import (
    distillation_loss,
    soft_targets,
    soften,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    soft = torch.softmax(torch.randn(5, 4, generator=g) * 2, dim=-1)
    targets = soft.argmax(-1)
    return logits, targets, soft


def kl_by_hand(logits, soft, t):
    """T^2 * mean over rows of sum_i p_T,i * (log p_T,i - log q_T,i), written out."""
    p = soft ** (1 / t)
    p = p / p.sum(-1, keepdim=True)
    log_q = logits / t - torch.logsumexp(logits / t, dim=-1, keepdim=True)
    return t * t * (p * (p.log() - log_q)).sum(-1).mean()


def test_alpha_zero_is_cross_entropy(batch):
    logits, targets, soft = batch
    assert torch.allclose(distillation_loss(logits, targets, soft, 2.0, 0.0),
                          F.cross_entropy(logits, targets))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_kl(batch, t):
    logits, targets, soft = batch
    assert torch.allclose(distillation_loss(logits, targets, soft, t, 1.0),
                          kl_by_hand(logits, soft, t), atol=1e-6)


def test_mixture_is_linear_in_alpha(batch):
    logits, targets, soft = batch
    kd, ce = (distillation_loss(logits, targets, soft, 2.0, a) for a in (1.0, 0.0))
    assert torch.allclose(distillation_loss(logits, targets, soft, 2.0, 0.3), 0.3 * kd + 0.7 * ce)


def test_one_hot_teacher_at_t1_is_cross_entropy(batch):
    logits, targets, _ = batch
    one_hot = F.one_hot(targets, 4).float()
    assert torch.allclose(distillation_loss(logits, targets, one_hot, 1.0, 1.0),
                          F.cross_entropy(logits, targets), atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gradient_matches_closed_form(batch, alpha):
    logits, targets, soft = batch
    t, n = 3.0, len(logits)
    z = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_loss(z, targets, soft, t, alpha), z)
    # d/dz T^2 KL(p_T || softmax(z/T)) = T (softmax(z/T) - p_T); d/dz CE = softmax(z) - onehot.
    kd = t * (torch.softmax(logits / t, -1) - soften(soft, t))
    ce = torch.softmax(logits, -1) - F.one_hot(targets, 4).float()
    assert torch.allclose(grad, (alpha * kd + (1 - alpha) * ce) / n, atol=1e-6)


def test_soften_flattens_keeps_zeros_and_normalises():
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0]])
    assert torch.equal(soften(p, 1.0), p)
    hot = soften(p, 4.0)
    assert math.isclose(hot.sum().item(), 1.0, rel_tol=1e-6)
    assert hot[0, 3] == 0 and hot[0, 0] < p[0, 0] and hot[0, 2] > p[0, 2]


def test_bad_arguments_raise(batch):
    logits, targets, soft = batch
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(logits, targets, soft, 2.0, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, targets, soft, 0.0, 0.5)


def test_soft_targets_renormalise_over_the_label_set():
    labels = ["a", "b", "c"]
    rows = soft_targets([{"a": 0.6, "b": 0.2, "zzz": 0.2}], ["a"], labels)
    assert rows == [[pytest.approx(0.75), pytest.approx(0.25), 0.0]]


def test_soft_targets_fall_back_to_one_hot():
    labels = ["a", "b", "c"]
    rows = soft_targets([None, {}, {"elsewhere": 1.0}], ["b", "c", "a"], labels)
    assert rows == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
