"""Which unlabeled requests to pay the teacher for, given their sentence vectors (pure numpy).

- `seed_picks`: before anything is labelled, one request per k-means cluster, the one nearest
  its centroid. k-means puts more centroids where requests are dense, so the seed follows the
  traffic's mix while still reaching its rare corners.
- `uncertain_picks`: afterwards, the requests the current model is least sure of (smallest
  margin between its two most likely labels), spread out by greedy k-center so that one
  round does not spend its budget on twenty copies of the same confusing request. This is
  the margin-then-diversity scheme of Citovsky et al. 2021 ("Batch active learning at scale"),
  with k-center (Sener & Savarese 2018) as the diversity step.
- `spread_picks`: k-center alone, for tasks with no label distribution to be unsure about.

Every function returns a prefix-stable order: asking for more picks from the same state
returns the same first ones, so raising a budget only adds requests (the rest hit the cache).
Vectors are unit rows, so a dot product is a cosine.
"""

from __future__ import annotations

import numpy as np

KMEANS_ITERATIONS = 25
# Uncertain candidates considered per pick: enough for k-center to choose among, few enough
# that the picks stay uncertain. Fixed per round (not per pick) for the prefix property.
CANDIDATES_PER_PICK = 5


def kmeans(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, cluster of each row) by k-means++ seeding and Lloyd iterations on cosine."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centroids = [x[rng.integers(len(x))]]
    nearest = 1.0 - x @ centroids[0]
    for _ in range(1, k):
        weights = np.clip(nearest, 0, None) ** 2
        total = weights.sum()
        pick = rng.choice(len(x), p=weights / total) if total > 0 else rng.integers(len(x))
        centroids.append(x[pick])
        nearest = np.minimum(nearest, 1.0 - x @ x[pick])
    c = np.stack(centroids)
    assign = np.zeros(len(x), dtype=np.int64)
    for _ in range(KMEANS_ITERATIONS):
        assign_new = np.argmax(x @ c.T, axis=1)
        if _ and np.array_equal(assign_new, assign):
            break
        assign = assign_new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                mean = members.mean(axis=0)
                c[j] = mean / max(np.linalg.norm(mean), 1e-12)
    return c, assign


def seed_picks(x: np.ndarray, k: int, seed: int) -> list[int]:
    """Row indices, one per k-means cluster (the member nearest its centroid), largest
    clusters first, so a partial seed round takes the commonest kinds of request."""
    if len(x) == 0 or k <= 0:
        return []
    centroids, assign = kmeans(x, k, seed)
    sizes = np.bincount(assign, minlength=len(centroids))
    similarity = x @ centroids.T
    picks = []
    for j in sorted(range(len(centroids)), key=lambda j: (-sizes[j], j)):
        members = np.flatnonzero(assign == j)
        if len(members):
            picks.append(int(members[np.argmax(similarity[members, j])]))
    return picks


def margins(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row: small is uncertain."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top = np.partition(probs, -2, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def uncertain_picks(x: np.ndarray, probs: np.ndarray, labelled: np.ndarray, n: int,
                    round_size: int) -> list[int]:
    """`n` rows of `x` (the unlabeled pool) among its `CANDIDATES_PER_PICK * round_size`
    smallest margins under `probs`, chosen by k-center against `labelled` (vectors)."""
    order = np.lexsort((np.arange(len(x)), margins(probs)))  # ties broken by row, stably
    candidates = order[:CANDIDATES_PER_PICK * round_size]
    return [int(candidates[i]) for i in k_center(x[candidates], labelled, n)]


def spread_picks(x: np.ndarray, labelled: np.ndarray, n: int) -> list[int]:
    """`n` rows of `x` by k-center against `labelled` alone."""
    return k_center(x, labelled, n)


def k_center(x: np.ndarray, labelled: np.ndarray, n: int) -> list[int]:
    """Greedy k-center: repeatedly the row farthest (in cosine distance) from everything
    labelled or picked so far. With nothing labelled, the first pick is row 0."""
    n = min(n, len(x))
    if n <= 0:
        return []
    if len(labelled):
        distance = 1.0 - (x @ labelled.T).max(axis=1)
    else:
        distance = np.full(len(x), np.inf)
    picks = []
    for _ in range(n):
        i = int(np.argmax(distance))  # argmax takes the first of equal rows: stable
        picks.append(i)
        distance = np.minimum(distance, 1.0 - x @ x[i])
        distance[i] = -np.inf
    return picks


def random_picks(n_rows: int, n: int, seed: int) -> list[int]:
    """`n` rows in one fixed seeded order of the whole pool (the control for active picks)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n_rows)[:n]]
