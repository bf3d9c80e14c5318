"""Builders for hermetic tests: fixture text, a tiny WordPiece tokenizer and BERT encoder trained
on it, and curate-style splits. Nothing is downloaded; everything is deterministic."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

LABELS = ("billing", "password_reset", "out_of_scope")

# Each class has its own vocabulary, so a tiny encoder trained from scratch separates them in a
# few epochs; the fillers are shared so no single token gives the class away by position.
TEMPLATES = {
    "billing": ("I was charged twice for my {x}", "why is there an extra charge on the {x} invoice",
                "please refund the double payment for my {x}", "my card was billed wrong for the {x}",
                "the {x} subscription costs more than the price I agreed"),
    "password_reset": ("I forgot my password for the {x}", "reset my login password on the {x} please",
                       "cannot sign in because the {x} says wrong password",
                       "locked out of my account after changing the {x} password",
                       "send me a password reset link for the {x}"),
    "out_of_scope": ("what is the weather like near the {x}", "tell me a funny joke about a {x}",
                     "who won the football match next to the {x}",
                     "recommend a good movie to watch with my {x}", "how tall is the mountain behind the {x}"),
}
FILLERS = ("phone", "laptop", "garden", "order", "app", "tablet", "kitchen", "car", "shop",
           "printer", "camera", "bike")


def classify_examples(per_label: int, offset: int = 0) -> list[tuple[str, str]]:
    """`per_label` (text, label) pairs per class, interleaved by class.

    Pairs are drawn from the template x filler grid in a fixed stride-7 order, so calls with
    non-overlapping [offset, offset + per_label) ranges give disjoint data (up to 60 per class).
    """
    out = []
    for label in LABELS:
        grid = list(itertools.product(TEMPLATES[label], FILLERS))
        picked = [grid[i * 7 % len(grid)] for i in range(offset, offset + per_label)]
        out.append([(t.format(x=x), label) for t, x in picked])
    return [pair for row in zip(*out) for pair in row]


def all_fixture_text() -> list[str]:
    return [t.format(x=x) for ts in TEMPLATES.values() for t in ts for x in FILLERS]


# --------------------------------------------------------------------------- tokenizer + encoder

def build_tokenizer(texts: Iterable[str]):
    """A BERT-style WordPiece tokenizer (lower-casing, [CLS] ... [SEP], token types) whose
    vocabulary is every word of `texts` plus single characters for anything else, wrapped for
    transformers.

    The vocabulary is built here rather than by `tokenizers`' WordPieceTrainer, which breaks
    frequency ties in hash order and so gives different ids in every process.
    """
    import string

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {w for text in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))}
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = specials + sorted(words | set(chars) | {f"##{c}" for c in chars})
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))])
    # token_type_ids as MiniLM's tokenizer has them, so the export's third input is exercised.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_tiny_encoder(path: Path, texts: Iterable[str] | None = None, hidden: int = 32,
                       layers: int = 2, seed: int = 0) -> Path:
    """Save an untrained 2-layer BERT encoder and its tokenizer to `path`: a stand-in for a
    pretrained base that the train stage pools and puts a head on."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_tokenizer(texts if texts is not None else all_fixture_text())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    # No dropout and a wide init (BERT's 0.02 is for pretraining at scale): random token
    # embeddings this far apart keep the fixture classes' mean-pooled vectors apart from the
    # start, so both the probe and fine-tuning have something to find in a few steps.
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- curate-style splits

def record(text: str, label: str, soft: dict[str, float] | None = None,
           cohort: str = "seed") -> dict:
    """One example record as docs/ARTIFACTS.md describes it."""
    rid = hashlib.sha256(json.dumps({"message": text}, sort_keys=True).encode()).hexdigest()[:16]
    return {"id": rid, "input": {"message": text}, "target": label, "messages": None,
            "soft": soft, "gold": None, "cohort": cohort, "source": "log",
            "provenance": {"request": None, "model": "test", "cost_usd": 0.0, "log": None}}


def write_splits(root: Path, train: Sequence[tuple[str, str]], val: Sequence[tuple[str, str]],
                 test: Sequence[tuple[str, str]] = (), labels: Sequence[str] | None = None,
                 soft: dict[str, dict[str, float]] | None = None) -> Path:
    """Write train/val/test.jsonl and labels.json into `root` like the curate stage does.

    `soft` maps a text to its teacher distribution; texts not in it get `"soft": null`.
    `labels` defaults to the train labels in order of first appearance.
    """
    root.mkdir(parents=True, exist_ok=True)
    soft = soft or {}
    for name, pairs in (("train", train), ("val", val), ("test", test)):
        lines = [json.dumps(record(t, y, soft.get(t)), sort_keys=True) for t, y in pairs]
        (root / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    labels = list(labels) if labels is not None else list(dict.fromkeys(y for _, y in train))
    (root / "labels.json").write_text(json.dumps(labels, indent=2))
    return root
