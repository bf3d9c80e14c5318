"""Train on the system turn once per micro-batch, not once per conversation.

Every conversation of a spec starts with the same system turn (the description, the output
schema or the tool signatures): 306 of the 547 tokens of an average support-agent conversation,
most of every SNIPS query. Under a causal mask the keys and values of those positions do not
depend on anything after them, so a micro-batch whose rows share a prefix runs it once (batch
1), repeats its KV cache across the rows and runs only the rows' suffixes against it. Autograd
sums the rows' gradients back through the repeated cache, so the loss and the gradients are the
unshared ones (to float rounding, tests/unit/test_shared_prefix.py) for a fraction of the FLOPs.

TRL's SFTTrainer still computes the loss: this only hands it the suffixes and the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from trl import SFTTrainer

MIN_SHARED = 16  # tokens; below this a second forward pass costs more than it saves


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> int:
    """Leading positions every row has identical and unpadded, ending before the first trained
    label: the label just after the prefix would be predicted from the prefix's last logits,
    which the suffix pass does not compute, so that position must carry none."""
    same = ((input_ids == input_ids[:1]) & (attention_mask == 1)).all(dim=0)
    common = int(same.int().cumprod(dim=0).sum())
    trained = (labels != -100).any(dim=0)
    first_label = int(trained.int().argmax()) if trained.any() else labels.shape[1]
    return max(0, min(common, first_label - 1))


def prefix_cache(model, input_ids: torch.Tensor, rows: int) -> DynamicCache:
    """The KV cache of `input_ids` (one row), repeated for `rows` rows. The fused LM head with
    no labelled position runs the backbone only: no logits over the vocabulary are built."""
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config)
    model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
          labels=torch.full_like(input_ids, -100), past_key_values=cache, fused_lm_head=True)
    cache.batch_repeat_interleave(rows)
    return cache


class SharedPrefixSFTTrainer(SFTTrainer):
    """SFTTrainer whose forward passes run a micro-batch's shared prefix once.

    Off in multi-process runs: DDP expects one forward pass per backward, and two would mark
    every parameter ready twice. `share_prefix=False` is TRL's own pass (for comparisons)."""

    def __init__(self, *args, share_prefix: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.share_prefix = share_prefix

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.get("input_ids")
        # return_outputs reruns the forward pass on the same inputs, after the first pass has
        # grown the cache: only the plain path can serve it.
        sharable = (self.share_prefix and ids is not None and ids.shape[0] > 1
                    and not return_outputs
                    and "position_ids" not in inputs and "labels" in inputs
                    and self.accelerator.num_processes == 1)
        shared = (shared_length(ids, inputs["attention_mask"], inputs["labels"])
                  if sharable else 0)
        if shared >= MIN_SHARED:
            inputs = {**inputs, "input_ids": ids[:, shared:], "labels": inputs["labels"][:, shared:],
                      "past_key_values": prefix_cache(model, ids[:1, :shared], ids.shape[0])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
