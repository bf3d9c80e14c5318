"""Classification metrics of a student against its teacher and, where records carry one, gold.

"Agreement" compares the student's label with the teacher's (the record's `target`): it is what
distillation optimises and what the gates check. "Accuracy" compares with a reference `gold`
label, which only benchmark data has; it is None when no record has gold.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence


def rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def agreement(predicted: Sequence[str], target: Sequence[str]) -> float | None:
    return rate(sum(p == t for p, t in zip(predicted, target)), len(target))


def gold_accuracy(predicted: Sequence[str], gold: Sequence[str | None]) -> float | None:
    """Accuracy on the records that have a gold label; None when none has."""
    pairs = [(p, g) for p, g in zip(predicted, gold) if g is not None]
    return rate(sum(p == g for p, g in pairs), len(pairs))


def per_label(predicted: Sequence[str], target: Sequence[str], labels: Sequence[str]) -> dict:
    """Precision, recall, F1 and support (count of `target`) per label.

    A label never predicted has precision None rather than 0: there is nothing to be wrong about.
    """
    tp, pred_n, true_n = Counter(), Counter(predicted), Counter(target)
    for p, t in zip(predicted, target):
        if p == t:
            tp[t] += 1
    out = {}
    for label in labels:
        precision = rate(tp[label], pred_n[label])
        recall = rate(tp[label], true_n[label])
        f1 = (2 * precision * recall / (precision + recall)
              if precision and recall else (0.0 if true_n[label] or pred_n[label] else None))
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": true_n[label]}
    return out


def macro_f1(table: dict) -> float | None:
    """Mean F1 over labels that occur in the targets (labels with no support are left out)."""
    scores = [row["f1"] for row in table.values() if row["support"]]
    return sum(scores) / len(scores) if scores else None


def confused_pairs(predicted: Sequence[str], target: Sequence[str], top: int = 10) -> list[dict]:
    """The most frequent (teacher label, student label) mistakes, most common first."""
    counts = Counter((t, p) for p, t in zip(predicted, target) if p != t)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [{"target": t, "predicted": p, "count": n} for (t, p), n in ranked[:top]]


def per_cohort(predicted: Sequence[str], target: Sequence[str], gold: Sequence[str | None],
               cohorts: Sequence[str]) -> dict:
    """Agreement (and gold accuracy) for each cohort: log, paraphrase:<register>, hard_negative..."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, cohort in enumerate(cohorts):
        groups[cohort].append(i)
    return {
        cohort: {"n": len(idx),
                 "agreement": agreement([predicted[i] for i in idx], [target[i] for i in idx]),
                 "accuracy": gold_accuracy([predicted[i] for i in idx], [gold[i] for i in idx])}
        for cohort, idx in sorted(groups.items())
    }


def classification_report(predicted: Sequence[str], target: Sequence[str],
                          gold: Sequence[str | None], cohorts: Sequence[str],
                          labels: Sequence[str]) -> dict:
    """Everything above for one split, as JSON-ready values."""
    table = per_label(predicted, target, labels)
    return {
        "n": len(target),
        "agreement": agreement(predicted, target),
        "accuracy": gold_accuracy(predicted, gold),
        "gold_n": sum(g is not None for g in gold),
        "macro_f1": macro_f1(table),
        "per_label": table,
        "confused_pairs": confused_pairs(predicted, target),
        "per_cohort": per_cohort(predicted, target, gold, cohorts),
    }
