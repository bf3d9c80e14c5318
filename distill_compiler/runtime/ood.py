"""Out-of-distribution scores: how far a request lies from what the student was trained on.

Every score is "higher = further out", computed with numpy from the classifier graph's two
outputs (logits and the pooled, L2-normalised embedding the head reads):

    mahalanobis  min over intents of |(z - mu_c) W|^2, W W^T the shrunk inverse of the
                 covariance shared by all intents (Lee et al. 2018; Podolskiy et al. 2021)
    knn          1 - cosine similarity to the k-th nearest of a compressed set of training
                 embeddings (Sun et al. 2022)
    energy       -logsumexp(logits) (Liu et al. 2020)
    max_prob     1 - the calibrated maximum probability (the max-softmax baseline)

The compiler fits the parameters (metrics/ood.py) and writes them into policy.json
(format.out_of_scope_fields); this module is what both its evaluation and the runtime score with.
"""

from __future__ import annotations

import base64

import numpy as np

from .format import OutOfScope


def pack(array: np.ndarray) -> dict:
    """An array as JSON: little-endian float32 bytes in base64, with its shape. About a third
    the size of decimal text, and exact."""
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape),
            "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def unpack(packed: dict) -> np.ndarray:
    if packed.get("dtype") != "float32":
        raise ValueError(f"packed array dtype {packed.get('dtype')!r} (expected float32)")
    shape = tuple(int(n) for n in packed["shape"])
    flat = np.frombuffer(base64.b64decode(packed["base64"]), dtype="<f4")
    return flat.reshape(shape).astype(np.float32)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[..., 0]


def mahalanobis(embeddings: np.ndarray, projection: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Squared distance to the nearest intent mean in the whitened space; `means` are already
    projected, so a request costs one (d x d) product and one (intents x d) distance."""
    z = np.asarray(embeddings, dtype=np.float64) @ projection
    # |z - m|^2 = |z|^2 - 2 z.m + |m|^2, without an (n, intents, d) temporary.
    d2 = (z * z).sum(-1, keepdims=True) - 2 * z @ means.T + (means * means).sum(-1)
    return np.maximum(d2.min(axis=-1), 0.0)


def knn(embeddings: np.ndarray, prototypes: np.ndarray, k: int) -> np.ndarray:
    """1 - cosine similarity to the k-th most similar prototype (both sides unit length)."""
    z = np.asarray(embeddings, dtype=np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    sims = z @ prototypes.T
    k = min(k, sims.shape[-1])
    kth = np.partition(sims, sims.shape[-1] - k, axis=-1)[:, sims.shape[-1] - k]
    return 1.0 - kth


def max_prob(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 1.0 - np.exp(z.max(axis=-1) - logsumexp(z))


class Detector:
    """A fitted out-of-distribution score and its threshold, from policy.json."""

    def __init__(self, section: OutOfScope, temperature: float):
        self.kind, self.threshold = section.kind, section.threshold
        self.validation = section.validation
        self.temperature = temperature
        params = section.params
        self.arrays = {name: unpack(value).astype(np.float64) for name, value in params.items()
                       if isinstance(value, dict)}
        self.k = int(params.get("k", 1))
        self.needs_embedding = self.kind in ("mahalanobis", "knn")

    def score(self, logits: np.ndarray, embeddings: np.ndarray | None) -> np.ndarray:
        if self.kind == "mahalanobis":
            return mahalanobis(embeddings, self.arrays["projection"], self.arrays["means"])
        if self.kind == "knn":
            return knn(embeddings, self.arrays["prototypes"], self.k)
        if self.kind == "energy":
            return -logsumexp(logits)
        return max_prob(logits, self.temperature)

    def flags(self, score: float) -> bool:
        return score > self.threshold
