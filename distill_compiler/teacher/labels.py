"""A teacher's answer read as a label, and label distributions for soft-label distillation.

Standard library only: the compiler reads generated and logged answers with it, and
`distill serve` reads the teacher's answers to escalated requests with the same rule.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# --------------------------------------------------------------------------- labels from answers

def normalize_label(text: str) -> str:
    """'  Password reset.' -> 'password_reset': how a label name is compared with an answer."""
    text = text.strip().strip("\"'`.:*").lower()
    return re.sub(r"[\s\-]+", "_", text)


def label_of(answer: str | None, labels: tuple[str, ...]) -> str | None:
    """The label an answer names: exactly, else the one label it starts with; None otherwise."""
    if not answer:
        return None
    text = normalize_label(answer.splitlines()[0] if answer.strip() else answer)
    if text in labels:
        return text
    starts = [label for label in labels if text.startswith(label)]
    return max(starts, key=len) if starts else None


def label_distribution(tokens: list[dict], labels: tuple[str, ...], chosen: str) -> dict[str, float]:
    """A distribution over labels from the logprobs of a label-name answer.

    Walking the answer's tokens, an alternative token at position k (with the greedy prefix
    before it) spells the start of some labels; it gives its probability, times the
    probability of the greedy prefix, to those labels (split evenly when several share that
    start, as `card_arrival` and `card_linking` share `card`). What stays on the greedy path
    goes to the label the teacher chose. Mass on text that names no label is dropped and the
    rest renormalised. With one-token labels this is simply the first token's top_logprobs.
    """
    mass: Counter[str] = Counter()
    prefix, path = "", 1.0
    for position in tokens:
        for alt, logprob in position["top"]:
            if alt == position["token"]:
                continue
            spelled = normalize_label(prefix + alt)
            matches = [l for l in labels if spelled and (l.startswith(spelled) or spelled.startswith(l))]
            for label in matches:
                mass[label] += path * math.exp(logprob) / len(matches)
        path *= math.exp(position["logprob"])
        prefix += position["token"]
        if normalize_label(prefix) == chosen:
            break
    mass[chosen] += path
    total = sum(mass.values())
    return {label: round(mass[label] / total, 6) for label in labels if mass[label] > 0}


def vote_distribution(votes: list[str | None], labels: tuple[str, ...]) -> dict[str, float]:
    counted = Counter(v for v in votes if v in labels)
    total = sum(counted.values())
    return {label: counted[label] / total for label in labels if counted[label]} if total else {}


def majority(distribution: dict[str, float], labels: tuple[str, ...]) -> str | None:
    """The most probable label; ties go to the label listed first in the spec."""
    if not distribution:
        return None
    return max(labels, key=lambda label: (distribution.get(label, 0.0), -labels.index(label)))
