"""A shallower classifier cut from the fine-tuned one (`student.layers`): every k-th encoder
layer, then distilled from the full-depth model's own soft labels.

Half the layers is half the encoder's work on every request, which int8 alone cannot give on a
CPU without VNNI. The cut starts from the *fine-tuned* layers rather than the base's, as
DistilBERT starts from every other layer of its teacher (Sanh et al., 2019): they already carry
the task. The top layer is always kept, so the head still reads the representation it was
fitted on and the cut model starts close to the full one instead of from a random head. The
full-depth model is the teacher of this step, so it costs no teacher API calls.
"""

from __future__ import annotations

import copy

import torch

from ...errors import StageError
from .model import PooledClassifier

# Where encoder families keep their layer stack: BERT, RoBERTa, MiniLM, ELECTRA, XLM-R
# (encoder.layer); DistilBERT (transformer.layer); ModernBERT (layers).
LAYER_STACKS = (("encoder", "layer"), ("transformer", "layer"), ("layers",))


def kept_layers(depth: int, layers: int) -> list[int]:
    """The indices of `layers` of `depth` layers, evenly spaced and ending at the top one:
    6 -> 3 keeps [1, 3, 5], 6 -> 2 keeps [2, 5], 12 -> 4 keeps [2, 5, 8, 11]."""
    if not 1 <= layers < depth:
        raise ValueError(f"can keep 1 to {depth - 1} of {depth} layers, not {layers}")
    step = depth / layers
    return [round((i + 1) * step) - 1 for i in range(layers)]


def layer_stack(encoder) -> tuple[object, str, torch.nn.ModuleList]:
    """(the module holding the layer list, its attribute name, the list) of a transformers
    encoder; a StageError names the architecture when it keeps its layers elsewhere."""
    for path in LAYER_STACKS:
        owner = encoder
        for name in path[:-1]:
            owner = getattr(owner, name, None)
        stack = getattr(owner, path[-1], None) if owner is not None else None
        if isinstance(stack, torch.nn.ModuleList):
            return owner, path[-1], stack
    raise StageError("train", f"student.layers: cannot find the layer stack of a "
                     f"{type(encoder).__name__}",
                     "drop student.layers, or use a BERT-family base such as minilm-l6")


def depth_of(model: PooledClassifier) -> int:
    return len(layer_stack(model.encoder)[2])


def cut(model: PooledClassifier, layers: int) -> tuple[PooledClassifier, list[int]]:
    """A copy of `model` keeping `layers` of its encoder layers (`kept_layers`), with its head;
    the original is left as it is. Returns the copy and the indices kept."""
    small = copy.deepcopy(model)
    owner, name, stack = layer_stack(small.encoder)
    keep = kept_layers(len(stack), layers)
    setattr(owner, name, torch.nn.ModuleList(stack[i] for i in keep))
    # save_pretrained writes the config, and from_pretrained builds this many layers from it.
    small.encoder.config.num_hidden_layers = layers
    return small, keep
