"""The served bundle's teacher: policy.json's `teacher` model called through litellm, and the
per-process budget its calls spend.

litellm is imported on a worker thread the first time a request escalates, so a bundle that
never escalates never loads it and the event loop never stalls on it. No retries: the client
is waiting. Every failure (no key, unreachable, timed out, an error, an answer that does not
fit the bundle, the budget spent) is a TeacherUnavailable whose message says why, never with
the key; the server answers with the student instead.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping


class TeacherUnavailable(Exception):
    """The teacher cannot answer this request; the message says why (never with the key)."""


@dataclass
class TeacherAnswer:
    message: dict   # the assistant message: content, and tool_calls when it called tools
    usage: dict     # prompt_tokens, completion_tokens, total_tokens
    cost_usd: float | None  # None when litellm cannot price the model
    finish_reason: str = "stop"


@dataclass
class Budget:
    """What teacher calls may spend in this process (--teacher-budget-usd); None: no cap.

    Checked before each call and charged after it, so calls already in flight when the cap is
    reached may pass it by their own cost. With a cap set, an answer litellm cannot price spends
    the whole cap: unknown prices must not let the server spend without bound."""

    limit_usd: float | None = None
    spent_usd: float = 0.0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self) -> None:
        with self._lock:
            if self.limit_usd is not None and self.spent_usd >= self.limit_usd:
                self.refused += 1
                raise TeacherUnavailable(f"teacher budget spent: ${self.spent_usd:.4f} of "
                                         f"${self.limit_usd:g} (--teacher-budget-usd)")

    def charge(self, cost_usd: float | None) -> None:
        with self._lock:
            if cost_usd is None:
                if self.limit_usd is not None:
                    self.spent_usd = max(self.spent_usd, self.limit_usd)
                return
            self.spent_usd += cost_usd


class TeacherClient:
    """The teacher named in policy.json, called through litellm."""

    def __init__(self, config: Mapping | None, timeout_s: float, env: Mapping[str, str],
                 budget: Budget | None = None):
        config = config or {}
        self.model: str | None = config.get("model")
        self.api_base: str | None = config.get("api_base")
        self.timeout_s = timeout_s
        self.budget = budget or Budget()
        key_env = config.get("api_key_env")
        self._api_key = env.get(key_env) if key_env else None
        self._litellm = None
        self._import_lock = asyncio.Lock()
        if not self.model:
            self.unavailable: str | None = "the bundle names no teacher (teacher.model)"
        elif key_env and not self._api_key:
            self.unavailable = f"${key_env} is not set in the server's environment"
        else:
            self.unavailable = None

    @property
    def provider(self) -> str | None:
        """litellm's provider prefix (`openai` of `openai/gpt-4o`), for telemetry."""
        return self.model.split("/", 1)[0] if self.model and "/" in self.model else None

    async def complete(self, messages: list[dict], **extra: Any) -> TeacherAnswer:
        """The teacher's message for `messages`; `extra` (tools, tool_choice, response_format)
        goes to litellm as given."""
        if self.unavailable:
            raise TeacherUnavailable(self.unavailable)
        self.budget.check()
        litellm = await self._load()
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                  "timeout": self.timeout_s, "num_retries": 0, "max_retries": 0,
                                  **{k: v for k, v in extra.items() if v is not None}}
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif self.api_base and not litellm.validate_environment(self.model).get("keys_in_environment"):
            kwargs["api_key"] = "no-key"  # a local OpenAI-compatible server wants none; the client does
        try:
            response = await asyncio.wait_for(litellm.acompletion(**kwargs), self.timeout_s)
        except asyncio.TimeoutError:
            raise TeacherUnavailable(f"no answer within {self.timeout_s:g}s") from None
        except Exception as exc:  # litellm maps every provider failure onto its own classes
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise TeacherUnavailable(f"{type(exc).__name__}: {first}".rstrip(": ")) from None
        cost = _cost(litellm, response)
        self.budget.charge(cost)
        return _answer(response, cost)

    async def _load(self):
        async with self._import_lock:
            if self._litellm is None:
                # Importing litellm takes seconds; on the event loop it would stall every request.
                litellm = await asyncio.to_thread(importlib.import_module, "litellm")
                litellm.suppress_debug_info = True
                self._litellm = litellm
        return self._litellm


def _cost(litellm, response) -> float | None:
    try:
        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # an unpriced model: litellm raises its own errors, or ValueError
        return None


def _answer(response, cost: float | None) -> TeacherAnswer:
    choice = response.choices[0]
    raw = choice.message
    message: dict = {"role": "assistant", "content": raw.content}
    calls = [{"id": c.id, "type": "function",
              "function": {"name": c.function.name, "arguments": c.function.arguments or "{}"}}
             for c in raw.tool_calls or ()]
    if calls:
        message["tool_calls"] = calls
    if not raw.content and not calls:
        raise TeacherUnavailable("the teacher returned no content")
    usage = getattr(response, "usage", None)
    prompt = getattr(usage, "prompt_tokens", 0) or 0
    completion = getattr(usage, "completion_tokens", 0) or 0
    return TeacherAnswer(message, {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}, cost,
                         "tool_calls" if calls else (choice.finish_reason or "stop"))
