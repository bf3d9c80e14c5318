"""The student's worker threads, and what the server answers when the teacher cannot.

onnxruntime releases the GIL, so `workers` requests run in parallel, each on one intra-op
thread. Batching concurrent classify requests was measured and lost on CPU: int8 models pay for
padding to the batch's longest input (on the harbor bundle, 145 single requests/s against 90/s
in batches of 32, on one core).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .openai_format import Reply
from .teacher import TeacherUnavailable


class StudentPool:
    """Runs the student (or any call that needs the bundle) on a pool of worker threads."""

    def __init__(self, predict: Callable[[dict], dict], workers: int):
        self._predict = predict
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="distill-student")

    async def predict(self, input: dict) -> dict:
        return await self.run(self._predict, input)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def fallback_info(info: dict, why: str) -> dict:
    """The `distill` field of an escalation the teacher could not answer: the student's answer
    stands, with route `student-fallback` and the reason it escalated and why it came back."""
    return {**info, "route": "student-fallback", "reason": f"{info['reason']}; teacher "
            f"unavailable: {why}"}


@dataclass
class Turn:
    """One answered request, with what it takes to ask the teacher the same: for escalations,
    and for shadow traffic, which compares the two answers later."""

    input: dict          # the bundle input
    messages: list[dict]  # what the teacher is sent
    extra: dict          # and with it: tools, tool_choice, response_format
    result: dict         # the runtime's answer
    student: Reply       # the student's answer


@dataclass
class Wiring:
    """What the task handlers share: the student's workers, the teacher, the escalation log,
    the counters, the spans and the shadow traffic."""

    student: StudentPool
    teacher: Any            # teacher.TeacherClient
    log: Any                # escalation_log.AppendLog | None
    metrics: Any            # metrics.Metrics
    telemetry: Any          # telemetry.Telemetry
    shadow: Any = None      # shadow.Shadow | None

    async def ask_teacher(self, messages: list[dict], **extra: Any):
        """The teacher's answer (TeacherAnswer), in a child span when telemetry is on."""
        with self.telemetry.teacher_call(self.teacher.model, self.teacher.provider) as span:
            answer = await self.teacher.complete(messages, **extra)
            span.teacher(answer, self.teacher.model)
        return answer

    async def finish(self, task, turn: Turn) -> Reply:
        """The reply to a turn the student answered: escalated when the policy routed it to
        the teacher, or when drift sends all traffic there; else the student's, and shadowed."""
        if turn.result["route"] == "teacher":
            return await self.escalate(task, turn, turn.student.info)
        drift = self.shadow.escalation_reason() if self.shadow is not None else None
        if drift is not None:
            return await self.escalate(task, turn, {**turn.student.info, "route": "teacher",
                                                    "reason": drift}, drifting=True)
        if self.shadow is not None:
            self.shadow.offer(task, turn)
        return turn.student

    async def escalate(self, task, turn: Turn, info: dict, drifting: bool = False) -> Reply:
        """The teacher's reply when it fits the bundle; else the student's, as student-fallback."""
        try:
            answer = await self.ask_teacher(turn.messages, **turn.extra)
            reply = task.teacher_reply(turn, answer, info)
        except TeacherUnavailable as exc:
            student = turn.student
            return Reply(student.message, fallback_info(info, str(exc)), student.usage,
                         student.finish_reason)
        self.append_log(task.log_row(turn, reply))
        if drifting:  # the pair the drift alarm needs to see agreement recover
            self.shadow.record(task, turn, reply)
        return reply

    def append_log(self, row: dict) -> None:
        if self.log is not None:
            self.log.append(row)
            self.metrics.escalation_lines += 1
