"""Rounds on the student's failures (`data.rounds`, classify): find where the model fails, ask
the teacher for examples around each failure, label them, refit, until the gain is too small.

Each round, with everything labelled so far (logs, generation, the pool):
1. the model is refit on the examples outside two held-out parts (a seventh each, fixed by
   example id): a linear head on the frozen sentence vectors, as between pool rounds
   (data/active.py: seconds per round where a fine-tune takes minutes);
2. its failures on the first held-out part, the round's validation: the examples it labels
   otherwise than the teacher, or labels right with a probability under FAILURE_CONFIDENCE;
3. those failures are clustered (k-means on their vectors) into at most
   `round_size / (2 * batch)` clusters, each named by its commonest (teacher label, label the
   model gave or nearly gave) pair;
4. for each cluster the teacher writes a batch of new messages like the cluster's (template
   `failure_cluster`) and a batch of near-misses the other way, messages of the confusing label that
   look like the target (`hard_negative`, as for `confusable_with`); all are labelled by the
   teacher, whatever was asked for;
5. the model is refit with them; the gain is its agreement on the second held-out part (never
   used to find failures, so the gain is not measured where the examples were aimed) minus
   the agreement before the round. Rounds stop when it falls under `data.min_gain`.
Every request goes through the per-request cache, and the prompts depend only on what was
labelled, so a rerun of the stage pays nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .active import RoundModel
from .records import PROBE_COHORTS, message_field, message_text
from .selection import kmeans

COHORT = "failure_round"
HELD_OUT = 7  # one example in 7 validates a round, another one in 7 measures its gain
FAILURE_CONFIDENCE = 0.5
EXAMPLES_SHOWN = 5  # failures quoted in each cluster's prompt


@dataclass
class Cluster:
    target: str  # what the teacher says these messages want
    other: str  # what the model answered, or nearly did
    texts: list[str]
    added: int = 0  # labelled examples the cluster's requests brought in

    def as_dict(self) -> dict:
        return {"target": self.target, "confused_with": self.other, "failures": len(self.texts),
                "added": self.added}


@dataclass
class RoundReport:
    index: int
    val_agreement: float  # the round model's, before the round's examples
    failures: int
    clusters: list[Cluster] = field(default_factory=list)
    added: int = 0
    gain_agreement: float | None = None  # on the second held-out part, after the round
    gain: float | None = None

    def as_dict(self) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}
        out["clusters"] = [c.as_dict() for c in self.clusters]
        return out


def part_of(record_id: str) -> int:
    """0: the round's validation, 1: where gain is measured, else the model's own examples."""
    return int(hashlib.sha256(f"round-part:{record_id}".encode()).hexdigest(), 16) % HELD_OUT


# One generation request of the teacher: (template, variables, the label it is meant to have).
Writing = tuple[str, dict, str]


class FailureRounds:
    """`write` sends generation requests (all at once) and returns, for each, the examples the
    teacher wrote and labelled; `styles` are the spec's registers as prompt text; `batch` is
    how many messages one request asks for; `label_help` names and describes every label."""

    def __init__(self, spec, spec_dir: Path, cache_root: Path,
                 write: Callable[[list[Writing]], Awaitable[list[list[dict]]]],
                 styles: list[str], batch: int, label_help: list[dict],
                 log: Callable[[str], None]):
        from ..spec.models import class_labels

        self.spec, self.spec_dir, self.cache_root = spec, spec_dir, cache_root
        self.write, self.styles, self.batch, self.log = write, styles, batch, log
        self.labels = class_labels(spec.intents, spec.refusals)
        self.help = {h["name"]: h for h in label_help}
        self.field = message_field(spec.input.schema_)
        self.rounds: list[RoundReport] = []
        self.stopped: str | None = None

    def stats(self) -> dict:
        return {"rounds_asked": self.spec.data.rounds, "min_gain": self.spec.data.min_gain,
                "stopped": self.stopped, "added": sum(r.added for r in self.rounds),
                "rounds": [r.as_dict() for r in self.rounds]}

    async def run(self, labelled: list[dict]) -> list[dict]:
        from .embeddings import SentenceEncoder

        encoder = SentenceEncoder(self.spec.data.embedder, self.spec_dir)
        # Out-of-scope probes only ever validate the detector (curate.is_probe): not data here.
        rows = [r for r in labelled if self._text(r) is not None and r.get("target") in self.labels
                and r["cohort"] not in PROBE_COHORTS]
        parts = np.array([part_of(r["id"]) for r in rows])
        x = encoder.encode_cached([self._text(r) for r in rows], self.cache_root)
        y = np.array([self.labels.index(r["target"]) for r in rows])
        texts = [self._text(r) for r in rows]
        val, check = np.flatnonzero(parts == 0), np.flatnonzero(parts == 1)
        fit_x, fit_y = x[parts > 1], list(y[parts > 1])
        if len(val) == 0 or len(check) == 0 or len(set(fit_y)) < 2:
            self.stopped = "too few labelled examples to hold two parts out"
            self.log(f"generate: failure rounds skipped: {self.stopped}")
            return []
        out: list[dict] = []
        before = self._agreement(fit_x, fit_y, x[check], y[check])
        for index in range(self.spec.data.rounds):
            model = RoundModel.fit(fit_x, fit_y, len(self.labels), self.spec.data.seed)
            probs = model.probs(x[val])
            wrong = (probs.argmax(1) != y[val]) | (probs.max(1) < FAILURE_CONFIDENCE)
            failed, failed_probs = val[wrong], probs[wrong]
            report = RoundReport(index, float((probs.argmax(1) == y[val]).mean()), len(failed))
            self.rounds.append(report)
            if not len(failed):
                self.stopped = "no failures on validation"
                break
            report.clusters = self._clusters(x[failed], [texts[i] for i in failed], y[failed],
                                             failed_probs)
            added = await self._ask(report)
            out += added
            report.added = len(added)
            if added:
                fit_x = np.concatenate([fit_x, encoder.encode([self._text(r) for r in added])])
                fit_y += [self.labels.index(r["target"]) if r["target"] in self.labels else None
                          for r in added]
            after = self._agreement(fit_x, fit_y, x[check], y[check])
            report.gain_agreement, report.gain = after, after - before
            self.log(f"generate: failure round {index}: {len(failed)} failures in "
                     f"{len(report.clusters)} clusters, {len(added)} examples added, agreement "
                     f"{before:.1%} -> {after:.1%}")
            before = after
            if report.gain < self.spec.data.min_gain:
                self.stopped = f"gain {report.gain:+.4f} under data.min_gain {self.spec.data.min_gain}"
                break
        return out

    # ----------------------------------------------------------------- one round

    def _clusters(self, x: np.ndarray, texts: list[str], targets: np.ndarray,
                  probs: np.ndarray) -> list[Cluster]:
        k = max(1, min(len(texts), self.spec.data.round_size // (2 * self.batch)))
        _, assign = kmeans(x, k, self.spec.data.seed)
        clusters = []
        for j in range(k):
            members = np.flatnonzero(assign == j)
            if not len(members):
                continue
            pairs = Counter()
            for i in members:
                ranked = np.argsort(-probs[i])
                other = ranked[0] if ranked[0] != targets[i] else ranked[1]
                pairs[(int(targets[i]), int(other))] += 1
            (target, other), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
            clusters.append(Cluster(self.labels[target], self.labels[other],
                                    [texts[i] for i in members]))
        return sorted(clusters, key=lambda c: (-len(c.texts), c.target, c.other))

    async def _ask(self, report: RoundReport) -> list[dict]:
        """Labelled examples from the round's requests: per cluster, a batch like its failures
        and a batch of near-misses from the label it is confused with."""
        style = self.styles[report.index % len(self.styles)]
        writings: list[Writing] = []
        for j, cluster in enumerate(report.clusters):
            target, other = self.help[cluster.target], self.help[cluster.other]
            writings.append(("failure_cluster", {
                "target": target, "other": other, "examples": cluster.texts[:EXAMPLES_SHOWN],
                "round": report.index, "style": style, "batch": j}, cluster.target))
            writings.append(("hard_negative", {
                "target": other, "other": target, "style": style,
                "batch": f"failure round {report.index}, {j}"}, cluster.other))
        done = await self.write(writings)
        out = []
        for j, cluster in enumerate(report.clusters):
            for records in done[2 * j:2 * j + 2]:
                for record in records:
                    record["provenance"].update(round=report.index,
                                                cluster=f"{cluster.target}/{cluster.other}")
                cluster.added += len(records)
                out += records
        return out

    def _agreement(self, fit_x: np.ndarray, fit_y: list, x: np.ndarray, y: np.ndarray) -> float:
        model = RoundModel.fit(fit_x, fit_y, len(self.labels), self.spec.data.seed)
        return float((model.probs(x).argmax(1) == y).mean())

    def _text(self, record: dict) -> str | None:
        return message_text(record, self.field)
