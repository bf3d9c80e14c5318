"""Fitting the out-of-scope detector, and what it does to the cascade at a given out-of-scope share
(numpy only).

The detector's parameters come from the training embeddings of the in-scope intents alone, and
its threshold from in-scope validation queries alone: the threshold flags at most
`max_false_out_of_scope` of them, so it does not move with how many out-of-scope rows the logs
happen to hold. Out-of-scope examples, when there are some, only choose among detectors and
measure recall. The scores themselves are runtime/ood.py's, so what is fitted here is what
ships.
"""

from __future__ import annotations

import math

import numpy as np

from ..runtime.format import OOD_KINDS, OOD_OUTCOMES, OutOfScope
from ..runtime.ood import Detector, pack

# Prototypes per intent for the kNN detector: k-means centroids of its training embeddings, so
# policy.json holds (intents x 16 x d) floats rather than every training example.
KNN_PROTOTYPES_PER_CLASS = 16
KNN_K = 1
KMEANS_ITERATIONS = 20
# Out-of-scope shares the projection curve is drawn at.
CURVE_SHARES = tuple(round(0.05 * i, 2) for i in range(11))


# --------------------------------------------------------------------------- fitting

def ledoit_wolf(centered: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance of rows already centred: a few hundred training rows
    in 384 dimensions give a singular sample covariance, and the shrinkage towards a scaled
    identity is chosen in closed form, with no out-of-scope data (Ledoit & Wolf 2004)."""
    x = np.asarray(centered, dtype=np.float64)
    n, d = x.shape
    sample = x.T @ x / n
    mu = np.trace(sample) / d
    x2 = x * x
    beta = (np.sum(x2.T @ x2) / n - np.sum(sample * sample)) / (d * n)
    delta = (np.sum(sample * sample) - 2 * mu * np.trace(sample) + d * mu * mu) / d
    shrinkage = 0.0 if delta <= 0 else min(max(beta, 0.0), delta) / delta
    return (1 - shrinkage) * sample + shrinkage * mu * np.eye(d)


def fit_mahalanobis(embeddings: np.ndarray, class_ids: np.ndarray) -> dict:
    """Class means and the whitening W (W W^T = inverse shared covariance), means projected."""
    x = np.asarray(embeddings, dtype=np.float64)
    classes = np.unique(class_ids)
    means = np.stack([x[class_ids == c].mean(axis=0) for c in classes])
    residual = x - means[np.searchsorted(classes, class_ids)]
    values, vectors = np.linalg.eigh(ledoit_wolf(residual))
    projection = vectors / np.sqrt(np.maximum(values, 1e-12 * values.max()))
    return {"projection": pack(projection), "means": pack(means @ projection)}


def spherical_kmeans(x: np.ndarray, m: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """`m` unit-length centroids of unit rows `x`, seeded by farthest-point traversal from the
    row nearest the mean (deterministic: no random seed to record)."""
    if len(x) <= m:
        return x.copy()
    chosen = [int(np.argmax(x @ x.mean(axis=0)))]
    best = x @ x[chosen[0]]
    for _ in range(m - 1):
        chosen.append(int(np.argmin(best)))
        best = np.maximum(best, x @ x[chosen[-1]])
    centroids = x[chosen].copy()
    for _ in range(iterations):
        assign = np.argmax(x @ centroids.T, axis=1)
        for j in range(m):
            members = x[assign == j]
            if len(members):
                c = members.sum(axis=0)
                centroids[j] = c / max(np.linalg.norm(c), 1e-12)
    return centroids


def fit_knn(embeddings: np.ndarray, class_ids: np.ndarray,
            per_class: int = KNN_PROTOTYPES_PER_CLASS, k: int = KNN_K) -> dict:
    x = np.asarray(embeddings, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    prototypes = np.concatenate([spherical_kmeans(x[class_ids == c], per_class)
                                 for c in np.unique(class_ids)])
    return {"prototypes": pack(prototypes), "k": k}


def fit_params(kind: str, embeddings: np.ndarray | None, class_ids: np.ndarray) -> dict:
    if kind == "mahalanobis":
        return fit_mahalanobis(embeddings, class_ids)
    if kind == "knn":
        return fit_knn(embeddings, class_ids)
    return {}


def candidate_kinds(has_embedding: bool, n_train: int) -> tuple[str, ...]:
    """The detectors this model and data allow: the embedding ones need the graph's embedding
    output and some training rows per intent."""
    usable = has_embedding and n_train > 0
    return tuple(k for k in OOD_KINDS if usable or k not in ("mahalanobis", "knn"))


def detector(kind: str, params: dict, temperature: float, threshold: float = math.inf) -> Detector:
    return Detector(OutOfScope(kind, threshold, params, {}), temperature)


def threshold_at(in_scope_scores: np.ndarray, max_false: float) -> float:
    """The lowest threshold that flags (score > threshold) at most `max_false` of the in-scope
    scores; +inf (flag nothing) when there are none."""
    s = np.sort(np.asarray(in_scope_scores, dtype=np.float64))
    if len(s) == 0:
        return math.inf
    allowed = math.floor(max_false * len(s) + 1e-9)
    return float(s[len(s) - allowed - 1]) if allowed < len(s) else float(s[0]) - 1.0


def auroc(in_scope_scores, out_of_scope_scores) -> float | None:
    """P(an out-of-scope score > an in-scope one), ties counted half (Mann-Whitney U)."""
    a = np.asarray(in_scope_scores, dtype=np.float64)
    b = np.asarray(out_of_scope_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return None
    a = np.sort(a)
    below, up_to = np.searchsorted(a, b, "left"), np.searchsorted(a, b, "right")
    return float((below + 0.5 * (up_to - below)).sum() / (len(a) * len(b)))


# --------------------------------------------------------------------------- cascade at a share

def outcomes(routes, correct) -> dict[str, float] | None:
    """Share of one population (in-scope or out-of-scope queries) per outcome: answered by the
    student right or wrong (refusals included), answered `out_of_scope`, or escalated."""
    n = len(routes)
    if n == 0:
        return None
    counts = dict.fromkeys(OOD_OUTCOMES, 0)
    for route, ok in zip(routes, correct):
        if route == "teacher":
            counts["teacher"] += 1
        elif route == "out_of_scope":
            counts["out_of_scope"] += 1
        else:
            counts["student_right" if ok else "student_wrong"] += 1
    return {k: v / n for k, v in counts.items()}


def worst_case_out_of_scope() -> dict[str, float]:
    """Out-of-scope outcomes when none were measured: every such query answered by the student
    with an intent it does not have."""
    return {"student_right": 0.0, "student_wrong": 1.0, "out_of_scope": 0.0, "teacher": 0.0}


def at_share(in_scope: dict, out_of_scope: dict, share: float,
             teacher_cost_per_request: float | None = None) -> dict:
    """The cascade on traffic of which `share` is out of scope. An `out_of_scope` answer is
    right for an out-of-scope query and wrong for an in-scope one; an escalation counts as
    right (the teacher answers it)."""
    mix = {k: (1 - share) * in_scope[k] for k in OOD_OUTCOMES}
    right = mix["student_right"] + share * out_of_scope["out_of_scope"]
    answered = (mix["student_right"] + mix["student_wrong"] + mix["out_of_scope"]
                + share * (1 - out_of_scope["teacher"]))
    escalation = mix["teacher"] + share * out_of_scope["teacher"]
    cost = None if teacher_cost_per_request is None else 1000 * teacher_cost_per_request * escalation
    return {"share": share, "accepted_accuracy": right / answered if answered > 0 else None,
            "escalation_rate": escalation, "cascade_usd_per_1k": cost}


def estimated_share(rate: float, false_rate: float, recall: float) -> float | None:
    """The live out-of-scope share behind an observed out-of-scope answer rate r, from the
    validated false rate α and recall R: r = (1 - π) α + π R, so π = (r - α) / (R - α),
    clipped to [0, 1]; None when R <= α (the detector tells nothing apart)."""
    if recall <= false_rate:
        return None
    return min(max((rate - false_rate) / (recall - false_rate), 0.0), 1.0)
