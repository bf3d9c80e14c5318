"""Chat completions over a classify bundle: the last user message is the input, the answer is
a label, a refusal's fixed response, `out_of_scope` (the bundle's detector flagged the request:
answered without the teacher), or the teacher's answer.

On the teacher route, `distill.label` is the teacher's answer mapped onto the bundle's labels
(null when it names none) beside `student_label`. When the request has no system message, a
labelling prompt naming the bundle's labels is put first, so the teacher answers with a label
the escalation log can record.
"""

from __future__ import annotations

from ..runtime.format import InputError
from ..teacher.labels import label_of
from .escalation_log import classify_row
from .metrics import OutOfScopeEstimate
from .openai_format import Reply
from .request import ApiError, bundle_input, messages_of
from .student import Turn, Wiring
from .teacher import TeacherUnavailable


class ClassifyTask:
    def __init__(self, bundle, wiring: Wiring):
        self.bundle, self.wiring = bundle, wiring
        wiring.metrics.out_of_scope = OutOfScopeEstimate.of(bundle.policy.data)

    def describe(self) -> dict:
        return {"task": "classify", "labels": self.bundle.labels}

    async def answer(self, body: dict) -> Reply:
        messages = messages_of(body)
        input = bundle_input(messages, self.bundle.policy.text_field, "classify")
        try:
            self.bundle.policy.check_input(input)
        except InputError as exc:
            raise ApiError(422, str(exc), "input_schema") from None  # runtime/inputs.py
        result = await self.wiring.student.predict(input)
        info = {"route": result["route"], "reason": result["reason"], "label": result["label"],
                "confidence": round(result["confidence"], 4)}
        if "out_of_scope_score" in result:
            info["out_of_scope_score"] = round(result["out_of_scope_score"], 4)
        content = result["output"].get("response") or result["label"]
        if not any(m.get("role") == "system" for m in messages):
            messages = [labelling_prompt(self.bundle.labels), *messages]
        turn = Turn(input, messages, {}, result,
                    Reply({"role": "assistant", "content": content}, info))
        return await self.wiring.finish(self, turn)

    def teacher_reply(self, turn: Turn, answer, info: dict) -> Reply:
        content = answer.message.get("content")
        if not content:
            raise TeacherUnavailable("the teacher returned no content")
        label = label_of(content, tuple(self.bundle.labels))
        return Reply({"role": "assistant", "content": content},
                     {**info, "label": label, "student_label": turn.result["label"]}, answer.usage)

    def log_row(self, turn: Turn, reply: Reply) -> dict:
        content = reply.message["content"]
        return classify_row(turn.input, reply.info["label"] or content.strip().splitlines()[0],
                            reason=turn.student.info["reason"], student_label=turn.result["label"],
                            student_confidence=turn.result["confidence"],
                            model=self.wiring.teacher.model)

    def compare(self, turn: Turn, reply: Reply) -> tuple[bool, str]:
        """(whether the teacher's label is the student's, the student's label)."""
        return reply.info["label"] == turn.result["label"], turn.result["label"]


def labelling_prompt(labels: list[str]) -> dict:
    """The system message put before requests that have none, in the shape of label.j2."""
    lines = "\n".join(f"- {label}: {label.replace('_', ' ')}" for label in labels)
    return {"role": "system", "content": "You route each user message to exactly one label.\n"
            f"Labels:\n{lines}\nAnswer with the label name only, exactly as written above: "
            "no punctuation, no explanation."}
