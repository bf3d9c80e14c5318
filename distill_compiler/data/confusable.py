"""Which intent pairs are close: the ones a student is likely to mix up, found before training.

Each intent is read as the normalised mean of the unit sentence vectors (data/embeddings.py)
of its own text (`name: description`), its spec examples and, when the spec replays logs, the
first LOGGED of the requests the log labels with it. The pairs with the highest cosine are the
confusable ones; generate asks the teacher for hard negatives between them as it does for the
pairs the spec names in `confusable_with`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Logged requests read per intent: enough to place it, few enough that a large log does not
# turn one encoder pass into minutes. The first ones in log order, so the pick is deterministic.
LOGGED = 32
# Cosines are ranked at this precision, so that a difference in float rounding between
# machines cannot reorder two pairs: an exact tie falls to the names.
DIGITS = 6

Pair = tuple[str, str]


def named_pairs(intents) -> list[Pair]:
    """The pairs `intents[].confusable_with` names, each once as (a, b) with a < b."""
    return sorted({tuple(sorted((i.name, other))) for i in intents for other in i.confusable_with})


def intent_texts(intents, replayed: list[dict], field: str | None) -> list[list[str]]:
    """For each intent in spec order, the texts its vector is the mean of."""
    logged: dict[str, list[str]] = {i.name: [] for i in intents}
    for record in replayed:
        mine = logged.get(record["target"]) if isinstance(record["target"], str) else None
        text = record["input"].get(field) if isinstance(record["input"], dict) else record["input"]
        if mine is not None and len(mine) < LOGGED and isinstance(text, str) and text.strip():
            mine.append(text)
    return [[f"{i.name.replace('_', ' ')}: {i.description}", *i.examples, *logged[i.name]]
            for i in intents]


def intent_vectors(encode, texts: list[list[str]]) -> np.ndarray:
    """(intents, dim) unit rows: each the normalised mean of its texts' unit vectors.
    `encode` is SentenceEncoder.encode; every text is encoded in one call."""
    rows = encode([t for group in texts for t in group])
    out, start = [], 0
    for group in texts:
        mean = rows[start:start + len(group)].mean(axis=0)
        out.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        start += len(group)
    return np.stack(out)


def nearest_pairs(names: list[str], vectors: np.ndarray, count: int,
                  exclude=()) -> list[tuple[str, str, float]]:
    """The `count` pairs of distinct names with the highest cosine, as (a, b, cosine) with
    a < b, nearest first; pairs in `exclude` (already named) are skipped, not counted."""
    skip = {tuple(sorted(p)) for p in exclude}
    cosine = vectors @ vectors.T
    ranked = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = sorted((names[i], names[j]))
            if (a, b) not in skip:
                ranked.append((-round(float(cosine[i, j]), DIGITS), a, b))
    return [(a, b, -c) for c, a, b in sorted(ranked)[:count]]


def found_pairs(spec, spec_dir: Path, replayed: list[dict]) -> list[tuple[str, str, float]]:
    """The `data.confusable_pairs` nearest intent pairs the spec does not already name."""
    from .embeddings import SentenceEncoder
    from .records import message_field

    if spec.task != "classify" or not spec.data.confusable_pairs or len(spec.intents) < 2:
        return []
    texts = intent_texts(spec.intents, replayed, message_field(spec.input.schema_))
    vectors = intent_vectors(SentenceEncoder(spec.data.embedder, spec_dir).encode, texts)
    return nearest_pairs([i.name for i in spec.intents], vectors, spec.data.confusable_pairs,
                         exclude=named_pairs(spec.intents))
