"""Shadow traffic and the drift alarm: a share of the requests the student answered is sent to
the teacher in the background, and the two answers are compared as the evaluate stage
compares them (the label; the call's name and arguments; the extracted fields).

Mirroring never delays or changes an answer: `offer` only puts the turn on a bounded queue
(dropped, and counted, when it is full) and workers drain it after the reply went out. Mirrored
calls spend the teacher's budget like escalations do. Each pair is appended to the shadow log
as a `teacher.logs` row (so a recompile learns from it) and summed in `/metrics` per key (the
student's label, or tool called) and per route, beside the bundle's validation agreement
(report.json's agreement on the traffic the student accepted, `val_accepted_accuracy`).

When the agreement over the last `window` pairs falls below the validation figure by more
than `margin`, the server logs a warning and sets `distill_drift`; with action `escalate` all
traffic then goes to the teacher, and since the student still answers each of those requests
first, every one of them is a pair, so the alarm clears once the agreement recovers.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter, deque
from dataclasses import dataclass

from .student import Turn
from .teacher import TeacherUnavailable

ANSWERED = ("student", "refusal")  # routes the student answered alone: what is mirrored


@dataclass(frozen=True)
class ShadowConfig:
    rate: float = 0.0            # share of student-answered requests mirrored
    queue: int = 64              # mirrored requests waiting; more are dropped
    window: int = 100            # pairs the rolling agreement is over
    margin: float = 0.05         # how far below validation agreement counts as drift
    action: str = "alert"        # alert | escalate
    workers: int = 2             # mirrored teacher calls in flight


class Shadow:
    def __init__(self, config: ShadowConfig, wiring, validation: float | None, log=None,
                 seed: int | None = None):
        self.config, self.wiring, self.validation, self.log = config, wiring, validation, log
        self.queue: asyncio.Queue = asyncio.Queue(config.queue)
        self.recent: deque[bool] = deque(maxlen=config.window)
        self.pairs: Counter[tuple[str, str]] = Counter()      # (route, key) -> pairs
        self.agreed: Counter[tuple[str, str]] = Counter()     # (route, key) -> agreeing pairs
        self.dropped: Counter[str] = Counter()                # why mirrored requests were lost
        self.drifting = False
        self._random = random.Random(seed)
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ the request path

    def offer(self, task, turn: Turn) -> None:
        """Maybe mirror this student-answered turn; never waits."""
        if turn.student.route not in ANSWERED or self._random.random() >= self.config.rate:
            return
        try:
            self.queue.put_nowait((task, turn))
        except asyncio.QueueFull:
            self.dropped["queue_full"] += 1

    def escalation_reason(self) -> str | None:
        if not (self.drifting and self.config.action == "escalate"):
            return None
        return (f"drift: live agreement {self.agreement():.2f} < validation "
                f"{self.validation:.2f} - {self.config.margin:g}")

    # ------------------------------------------------------------------ the background

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._drain()) for _ in range(self.config.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self) -> None:
        while True:
            task, turn = await self.queue.get()
            try:
                await self._mirror(task, turn)
            finally:
                self.queue.task_done()

    async def _mirror(self, task, turn: Turn) -> None:
        try:
            answer = await self.wiring.ask_teacher(turn.messages, **turn.extra)
            reply = task.teacher_reply(turn, answer, turn.student.info)
        except TeacherUnavailable as exc:
            self.dropped["budget" if "budget" in str(exc) else "teacher_failed"] += 1
            return
        self.record(task, turn, reply)
        if self.log is not None:
            self.log.append(task.log_row(turn, reply))

    def record(self, task, turn: Turn, teacher_reply) -> None:
        """Sum one (student, teacher) pair and update the alarm."""
        agrees, key = task.compare(turn, teacher_reply)
        slot = (turn.student.route, key)
        self.pairs[slot] += 1
        self.agreed[slot] += agrees
        self.recent.append(agrees)
        self._update_alarm()

    def agreement(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 1.0

    def _update_alarm(self) -> None:
        if self.validation is None or len(self.recent) < self.recent.maxlen:
            return
        drifting = self.agreement() < self.validation - self.config.margin
        if drifting != self.drifting:
            state = "drifting" if drifting else "recovered"
            print(f"warning: {state}: live agreement {self.agreement():.2f} over the last "
                  f"{len(self.recent)} mirrored requests, validation {self.validation:.2f} "
                  f"(--drift-margin {self.config.margin:g})", file=sys.stderr, flush=True)
        self.drifting = drifting

    # ------------------------------------------------------------------ /metrics

    def render(self) -> list[str]:
        out = ["# HELP distill_shadow_pairs_total Mirrored requests compared, by route and "
               "the student's label or tool.", "# TYPE distill_shadow_pairs_total counter"]
        out += [f'distill_shadow_pairs_total{{route="{r}",key="{k}"}} {n}'
                for (r, k), n in sorted(self.pairs.items())]
        out += ["# HELP distill_shadow_agreements_total Mirrored requests where student and "
                "teacher agree.", "# TYPE distill_shadow_agreements_total counter"]
        out += [f'distill_shadow_agreements_total{{route="{r}",key="{k}"}} {self.agreed[(r, k)]}'
                for (r, k) in sorted(self.pairs)]
        out += ["# HELP distill_shadow_dropped_total Mirrored requests lost, by why.",
                "# TYPE distill_shadow_dropped_total counter"]
        out += [f'distill_shadow_dropped_total{{reason="{r}"}} {n}'
                for r, n in sorted(self.dropped.items())]
        out += ["# HELP distill_shadow_agreement Agreement over the last mirrored requests.",
                "# TYPE distill_shadow_agreement gauge",
                f"distill_shadow_agreement {self.agreement():.6f}",
                "# HELP distill_drift 1 while the live agreement is below validation by more "
                "than the margin.", "# TYPE distill_drift gauge",
                f"distill_drift {int(self.drifting)}"]
        if self.validation is not None:
            out += ["# HELP distill_validation_agreement The bundle's validation agreement on "
                    "accepted traffic.", "# TYPE distill_validation_agreement gauge",
                    f"distill_validation_agreement {self.validation:.6f}"]
        return out
