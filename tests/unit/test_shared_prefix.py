"""The shared-prefix forward pass: the same loss and gradients as TRL's plain pass, with the
system turn run once per micro-batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_causal import FEW_STEPS, causal_spec, sft_for
from tiny_causal import agent_record, build_tiny_llama, extract_record
from trl import SFTTrainer

from distill_compiler.students.causal.shared_prefix import MIN_SHARED, shared_length
from distill_compiler.students.causal.train import micro_batch


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("decoder"))


def loss_and_grads(trainer, compute_loss, batch) -> tuple[float, dict]:
    trainer.model.zero_grad()
    loss = compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def rows_seen(trainer, compute_loss, batch) -> list[tuple[int, int]]:
    """Shapes of the token batches the embedding layer was given, in order."""
    shapes = []
    embed = trainer.model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    try:
        compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=None)
    finally:
        handle.remove()
    return shapes


@pytest.mark.parametrize("task, records", [
    ("agent", [agent_record(i) for i in range(3)]),
    ("extract", [extract_record(i) for i in range(4)]),
])
def test_shared_pass_equals_the_plain_one(tmp_path, tiny_decoder, task, records):
    spec = causal_spec(task, base=str(tiny_decoder), **FEW_STEPS)
    trainer, _ = sft_for(tmp_path, spec, records)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    shared = shared_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert shared >= MIN_SHARED  # the system turn

    plain_loss, plain = loss_and_grads(trainer, SFTTrainer.compute_loss, batch)
    shared_loss, grads = loss_and_grads(trainer, type(trainer).compute_loss, batch)

    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert grads.keys() == plain.keys()
    for name, grad in plain.items():
        scale = grad.abs().max().clamp(min=1e-8)
        assert (grads[name] - grad).abs().max() / scale < 1e-4, name
    rows, width = batch["input_ids"].shape
    assert rows_seen(trainer, type(trainer).compute_loss, batch) == [(1, shared),
                                                                     (rows, width - shared)]


def test_shared_length_stops_at_padding_and_before_the_first_label():
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    none = torch.full_like(ids, -100)
    assert shared_length(ids, mask, none) == 4
    # a label at position 3 is predicted from position 2's logits: keep 0..2 out of the prefix
    labels = none.clone()
    labels[1, 3] = 8
    assert shared_length(ids, mask, labels) == 2
    padded = mask.clone()
    padded[0, 1] = 0
    assert shared_length(ids, padded, none) == 1
    assert shared_length(torch.tensor([[1, 2], [3, 2]]), torch.ones(2, 2), none[:, :2]) == 0


def test_micro_batches_count_a_shared_prefix_once():
    assert micro_batch(16, 1024) == 2
    assert micro_batch(16, 911, shared=306) == 2       # (2048 - 306) // 605
    assert micro_batch(16, 420, shared=360) == 16      # short queries under a long system turn
    assert micro_batch(4, 4096) == 1
    # a pass that fits 3 rows runs 2 when the step holds 4: passes add up to the batch size
    assert micro_batch(4, 800, shared=306) == 2
    assert micro_batch(12, 800, shared=306) == 3
