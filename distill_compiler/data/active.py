"""Active selection over an unlabeled traffic pool (`teacher.pool`): pay the teacher only for the
requests that teach, within `data.label_budget`.

Rounds of `data.round_size` requests, each labelled (classify) or extracted (extract) by the
teacher through the per-request cache before the next round is chosen:
1. a seed, stratified by k-means clusters of the pool's sentence vectors (skipped for classify
   when logs or generation already labelled two classes or more);
2. then, for classify, the requests the current model is least sure of, spread by k-center
   (data/selection.py). The model between rounds is a linear head on the frozen sentence
   vectors, refit on everything labelled so far and calibrated by temperature on a held-out
   fifth: the classify student's own first step (students/classifier/train.probe), seconds per
   round where a fine-tune would take minutes. For extract, k-center alone.

`data.selection: random` takes one seeded order of the pool instead, the control the
benchmark compares against. Picks are prefix-stable, so a rerun pays nothing and a larger
budget pays only for the requests it adds. When `teacher.budget_usd` or `max_requests` is
reached, selection ends with what was labelled (the rest of that round is cached too).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .records import message_field, message_text
from .selection import margins, random_picks, seed_picks, spread_picks, uncertain_picks

POOL_COHORT = "pool"
HELD_OUT_EVERY = 5  # one labelled example in five calibrates the round's model
MIN_TO_CALIBRATE = 20
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(4.0), 25))


@dataclass(frozen=True)
class PoolRequest:
    text: str
    where: str  # file:line, kept in the example's provenance


@dataclass
class Round:
    index: int
    by: str  # seed | margin+k-center | k-center | random
    selected: int
    labelled: int  # of those, how many the teacher answered with a usable label/extraction
    model_heldout_agreement: float | None = None  # the round model's, before its picks
    mean_margin: float | None = None  # of its picks under that model

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


class PoolSelection:
    def __init__(self, spec, spec_dir: Path, cache_root: Path,
                 answer: Callable[[str, str], Awaitable[dict | None]], log: Callable[[str], None]):
        from ..spec.models import class_labels

        self.field = message_field(spec.input.schema_)
        self.spec, self.spec_dir, self.cache_root = spec, spec_dir, cache_root
        self.answer, self.log = answer, log
        self.labels = class_labels(spec.intents, spec.refusals) if spec.task == "classify" else ()
        self.rounds: list[Round] = []
        self.stopped: str | None = None
        self.pool_size = 0  # after duplicates and already-labelled requests are set aside

    async def run(self, pool: list[PoolRequest], known: list[dict]) -> list[dict]:
        """Labelled pool examples, round by round; `known` are the examples already labelled
        (logs, seeds, generation), which the first model learns from and k-center avoids."""
        data = self.spec.data
        seen = {self._text(r) for r in known}
        pool = [r for r in unique(pool) if r.text not in seen]
        self.pool_size = len(pool)
        budget = len(pool) if data.label_budget is None else min(data.label_budget, len(pool))
        if data.selection == "random":
            order = random_picks(len(pool), budget, data.seed)
            return await self._label_in_rounds(pool, order)
        return await self._active(pool, known, budget)

    def stats(self) -> dict:
        return {"pool": self.pool_size, "selection": self.spec.data.selection,
                "label_budget": self.spec.data.label_budget,
                "selected": sum(r.selected for r in self.rounds),
                "labelled": sum(r.labelled for r in self.rounds),
                "stopped": self.stopped, "rounds": [r.as_dict() for r in self.rounds]}

    # ----------------------------------------------------------------- rounds

    async def _label_in_rounds(self, pool: list[PoolRequest], order: list[int]) -> list[dict]:
        out: list[dict] = []
        size = self.spec.data.round_size
        for start in range(0, len(order), size):
            picks = order[start:start + size]
            labelled = await self._label([pool[i] for i in picks], len(self.rounds))
            self.rounds.append(Round(len(self.rounds), "random", len(picks), len(labelled)))
            out += labelled
            if self.stopped:
                break
        return out

    async def _active(self, pool: list[PoolRequest], known: list[dict], budget: int) -> list[dict]:
        from .embeddings import SentenceEncoder

        encoder = SentenceEncoder(self.spec.data.embedder, self.spec_dir)
        x = encoder.encode_cached([r.text for r in pool], self.cache_root)
        known = [r for r in known if self._text(r) is not None]
        known_x = encoder.encode_cached([self._text(r) for r in known], self.cache_root)
        labelled_x, labelled_y = known_x, [self._label_id(r) for r in known]
        remaining = np.arange(len(pool))
        size, out = self.spec.data.round_size, []
        while len(pool) - len(remaining) < budget and len(remaining) and not self.stopped:
            take = min(size, budget - (len(pool) - len(remaining)))
            round_ = Round(len(self.rounds), "", take, 0)
            picks = self._pick(x[remaining], labelled_x, labelled_y, take, round_)
            chosen = remaining[picks]
            labelled = await self._label([pool[i] for i in chosen], round_.index)
            round_.labelled = len(labelled)
            self.rounds.append(round_)
            self.log(f"generate: pool round {round_.index} ({round_.by}): {take} picked, "
                     f"{len(labelled)} labelled")
            out += labelled
            by_text = {self._text(r): r for r in labelled}
            answered = [i for i in chosen if pool[i].text in by_text]
            labelled_x = np.concatenate([labelled_x, x[answered]]) if answered else labelled_x
            labelled_y += [self._label_id(by_text[pool[i].text]) for i in answered]
            remaining = np.setdiff1d(remaining, chosen, assume_unique=True)
        return out

    def _pick(self, x: np.ndarray, labelled_x: np.ndarray, labelled_y: list[int | None],
              take: int, round_: Round) -> list[int]:
        size, seed = self.spec.data.round_size, self.spec.data.seed
        classes = {y for y in labelled_y if y is not None}
        if self.spec.task == "classify" and len(classes) >= 2:
            model = RoundModel.fit(labelled_x, labelled_y, len(self.labels), seed)
            probs = model.probs(x)
            picks = uncertain_picks(x, probs, labelled_x, take, size)
            round_.by, round_.model_heldout_agreement = "margin+k-center", model.heldout_agreement
            round_.mean_margin = float(margins(probs[picks]).mean()) if picks else None
            return picks
        if len(labelled_x) == 0:
            round_.by = "seed"
            return seed_picks(x, size, seed)[:take]
        round_.by = "k-center"
        return spread_picks(x, labelled_x, take)

    async def _label(self, requests: list[PoolRequest], round_index: int) -> list[dict]:
        """The teacher's answers to one round, in the round's order; requests it would not
        answer within the budget are dropped, and end the selection."""
        from ..teacher.client import BudgetExhausted, gather_or_cancel

        async def one(request: PoolRequest) -> dict | None:
            try:
                record = await self.answer(request.text, POOL_COHORT)
            except BudgetExhausted as stop:
                self.stopped = stop.what
                return None
            record["provenance"].update(pool=request.where, round=round_index)
            return record

        done = await gather_or_cancel([one(r) for r in requests])
        if self.stopped:
            self.log(f"generate: {self.stopped}: pool selection ends after round {round_index}")
        return [r for r in done if r is not None]

    # ----------------------------------------------------------------- records

    def _text(self, record: dict) -> str | None:
        return message_text(record, self.field)

    def _label_id(self, record: dict) -> int | None:
        target = record.get("target")
        return self.labels.index(target) if target in self.labels else None


def unique(pool: list[PoolRequest]) -> list[PoolRequest]:
    """The first of each text: the teacher's answer to a repeated request is the same answer."""
    seen: set[str] = set()
    out = []
    for request in pool:
        if request.text not in seen:
            seen.add(request.text)
            out.append(request)
    return out


class RoundModel:
    """Multinomial logistic regression on the frozen sentence vectors, its L2 penalty and its
    temperature chosen on a held-out fifth (by log-loss), then refit on everything: a margin
    read off it ranks requests by how unsure the model is, on a scale that means the same
    from one round to the next."""

    def __init__(self, head, temperature: float, heldout_agreement: float | None):
        self.head, self.temperature, self.heldout_agreement = head, temperature, heldout_agreement

    @classmethod
    def fit(cls, x: np.ndarray, y: list[int | None], n_classes: int, seed: int) -> RoundModel:
        from ..students.classifier.train import PROBE_DEFAULT_L2, PROBE_L2

        rows = np.array([i for i, label in enumerate(y) if label is not None])
        ids = np.array([y[i] for i in rows])
        order = np.random.default_rng(seed).permutation(len(rows))
        held = order[::HELD_OUT_EVERY] if len(rows) >= MIN_TO_CALIBRATE else order[:0]
        fit_rows = np.setdiff1d(np.arange(len(rows)), held)
        l2, temperature, agreement = PROBE_DEFAULT_L2, 1.0, None
        if len(held):
            best = None
            for penalty in PROBE_L2:
                head = _head(x[rows[fit_rows]], ids[fit_rows], n_classes, penalty)
                logits = _logits(head, x[rows[held]])
                for t in TEMPERATURES:
                    loss = _log_loss(logits / t, ids[held])
                    if best is None or loss < best[0]:
                        best = (loss, penalty, float(t), float((logits.argmax(1) == ids[held]).mean()))
            _, l2, temperature, agreement = best
        return cls(_head(x[rows], ids, n_classes, l2), temperature, agreement)

    def probs(self, x: np.ndarray) -> np.ndarray:
        z = _logits(self.head, x) / self.temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def _head(x: np.ndarray, ids: np.ndarray, n_classes: int, l2: float):
    """The probe's convex fit (train.fit_head): cross-entropy + l2 |W|^2, L-BFGS from zeros."""
    import torch

    from ..students.classifier.train import Split, fit_head

    targets = torch.from_numpy(ids.astype(np.int64))
    split = Split([], [], targets, torch.zeros(len(ids), n_classes))  # soft unused at alpha 0
    return fit_head(torch.from_numpy(np.ascontiguousarray(x)), split, l2, 1.0, 0.0)


def _logits(head, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return head(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def _log_loss(logits: np.ndarray, ids: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids)), ids].mean())
