"""The teacher client: litellm's async API behind a cache, a concurrency bound, retries and a budget.

One `Teacher` serves any provider string litellm knows (`openai/...`, `anthropic/...`,
`ollama/...`, or any OpenAI-compatible `api_base`), or several deployments through litellm's
Router (`teacher.deployments`, teacher/router.py); `BatchTeacher` (teacher/batch.py) sends
the same requests through the provider's batch endpoint instead (`teacher.batch`). Each request is looked up in the
per-request cache first (teacher/cache.py); only misses are sent, at most
`max_concurrency` at a time, and each answer is committed to the cache the moment it
arrives, so an interrupted build keeps everything it paid for.

Retries: 429, 5xx, timeouts and connection errors are retried up to `max_retries` times with
exponential backoff and full jitter, waiting at least what a Retry-After header asks. Other
errors (bad key, bad request) are not retried: they would fail the same way again.

Budget: `max_requests` caps paid requests exactly (a slot is reserved before sending);
`budget_usd` stops new requests once the spend reaches it, so requests already in flight (at
most `max_concurrency`) may take it slightly past. Both raise `BudgetExhausted`, whose
message says what was spent.

Classification labels (see `label_distribution`): the labelling prompt asks for the label
name and nothing else, and the answer's token logprobs are mapped onto the labels by prefix.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from ..errors import DistillError, StageError
from .cache import RequestCache, request_key
from .keys import api_key_for

# litellm fetches its price map from the network at import time unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TOP_LOGPROBS = 20  # the most OpenAI-compatible servers return


@dataclass(frozen=True)
class Request:
    """One chat completion; every field but `kind` is part of the cache key."""

    messages: tuple[dict, ...] | list[dict]
    temperature: float = 0.0
    max_tokens: int | None = None
    response_format: dict | None = None
    tools: list[dict] | None = None
    logprobs: bool = False
    sample: int = 0  # the n-th draw of the same request (sampled soft labels)
    # What the request is for ("generation", "label", "agent_turn", ...): not sent, not keyed;
    # the cost estimate (teacher/estimate.py) groups requests by it.
    kind: str = "request"

    def key(self, model: str, api_base: str | None) -> str:
        """The per-request cache key of this request sent to `model` at `api_base`."""
        return request_key(model, api_base, list(self.messages), self.params(), self.sample)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.response_format is not None:
            params["response_format"] = self.response_format
        if self.tools:
            params["tools"] = self.tools
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return params


def json_schema_format(name: str, schema: dict) -> dict:
    """A `response_format` asking for structured output that follows `schema`."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


@dataclass(frozen=True)
class AnswerKeys:
    """Where a teacher's answers live in the request cache: under the model that gave them,
    looked up in the order the models are asked.

    A single `teacher.model`'s keys carry its `api_base`, as they always have (a name such as
    `openai/x` means whatever the server at that base serves). Deployments' keys carry none:
    the spec says which deployments serve the same model, so any of them finds what another
    one answered, while a different model's answers stay under their own keys.
    """

    models: tuple[str, ...]
    api_base: str | None

    @classmethod
    def of(cls, config) -> AnswerKeys:
        return cls(config.models, None if config.deployments else config.api_base)

    def key(self, request: Request, model: str | None = None) -> str:
        return request.key(model or self.models[0], self.api_base)

    def lookup(self, cache: RequestCache | None, request: Request) -> Reply | None:
        """The cached answer of the first model that has one, or None."""
        for model in self.models if cache is not None else ():
            key = self.key(request, model)
            hit = cache.get(key)
            reply = cached_reply(key, hit, model) if hit is not None else None
            if reply is not None:
                return reply
        return None


@dataclass(frozen=True)
class Reply:
    key: str
    content: str | None
    tool_calls: list[dict] | None
    # Per generated token: {"token", "logprob", "top": [[token, logprob], ...]}; None when the
    # provider returned no logprobs.
    logprobs: list[dict] | None
    cost_usd: float
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    # The model that answered (of teacher.models); None in answers cached before it was kept.
    model: str | None = None

    def as_cached(self) -> dict:
        return {"content": self.content, "tool_calls": self.tool_calls, "logprobs": self.logprobs,
                "cost_usd": self.cost_usd, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "model": self.model}


class BadReply(ValueError):
    """An answer that arrived but cannot be used (not JSON, wrong shape); its reason is a rule name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def parse_json(content: str | None, schema: dict) -> Any:
    """The JSON value in an answer, validated against `schema` even when the provider
    promised structured output (not every provider keeps that promise)."""
    if not content:
        raise BadReply("empty_answer", "the teacher returned no content")
    text = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", content)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadReply("malformed_json", str(exc)) from None
    errors = sorted(jsonschema.validators.validator_for(schema)(schema).iter_errors(value),
                    key=lambda e: list(e.path))
    if errors:
        raise BadReply("schema_invalid", errors[0].message)
    return value


class BudgetExhausted(StageError):
    def __init__(self, what: str, usage: Usage):
        self.what = what
        super().__init__("generate", f"{what}: {usage.describe()}",
                         "completed requests are cached: raise the limit (or leave it) and rerun "
                         "to pay only for the rest")


@dataclass
class Usage:
    requests: int = 0  # paid (sent) requests, retries not counted
    cached: int = 0
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def describe(self) -> str:
        return (f"spent ${self.cost_usd:.4f} on {self.requests} requests "
                f"({self.prompt_tokens} prompt + {self.completion_tokens} completion tokens); "
                f"{self.cached} answers reused from the cache")


BACKOFF_BASE_S = 1.0  # first retry waits up to this; tests set it to milliseconds


@dataclass
class Backoff:
    base: float = field(default_factory=lambda: BACKOFF_BASE_S)
    cap: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        jittered = self.rng.uniform(0, min(self.cap, self.base * 2 ** attempt))
        return max(jittered, retry_after or 0.0)


class Teacher:
    def __init__(self, config, cache: RequestCache, *, backoff: Backoff | None = None,
                 env: dict[str, str] | None = None):
        if not config.models:
            raise StageError("generate", "this spec asks for teacher requests but sets no teacher.model",
                             "set teacher.model or teacher.deployments, or generate from "
                             "teacher.logs only")
        env = os.environ if env is None else env
        self.keys = AnswerKeys.of(config)
        self.timeout_s, self.max_retries = config.timeout_s, config.max_retries
        self.budget_usd, self.max_requests = config.budget_usd, config.max_requests
        self.cache, self.backoff = cache, backoff or Backoff()
        self.usage = Usage()
        if config.deployments:
            from .router import Deployments

            self.route = Deployments(config.deployments, timeout_s=self.timeout_s, env=env)
        else:
            self.route = Direct(config.model, config.api_base, api_key_for(
                config.api_key_env, config.api_base, config.model, env), timeout_s=self.timeout_s)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._key_locks: dict[str, asyncio.Lock] = {}
        # Set by the first error that must end the build (budget spent, provider down): every
        # later request raises it before sending, while requests already in flight finish
        # and are cached. Callers drain their tasks instead of cancelling them.
        self.halted: StageError | None = None

    @property
    def model(self) -> str:
        """The model asked first."""
        return self.keys.models[0]

    def key(self, request: Request) -> str:
        return self.keys.key(request)

    async def complete(self, request: Request) -> Reply:
        # One lock per request: identical requests in flight at once are paid for once.
        async with self._key_locks.setdefault(self.key(request), asyncio.Lock()):
            cached = self.keys.lookup(self.cache, request)
            if cached is not None:
                self.usage.cached += 1
                return cached
            async with self._slots:
                self._reserve()
                response = await self._send(request)
            model = self.served_by(response)
            reply = self._reply(self.keys.key(request, model), model, response)
            self.cache.put(reply.key, model, reply.as_cached())
        self.usage.cost_usd += reply.cost_usd
        self.usage.prompt_tokens += reply.prompt_tokens
        self.usage.completion_tokens += reply.completion_tokens
        return reply

    def served_by(self, response) -> str:
        """The model that produced a response `_send` returned."""
        return self.route.served_by(response)

    def _reserve(self) -> None:
        """Count a paid request about to be sent, or refuse it once the build must stop."""
        if self.halted is None and self.max_requests is not None \
                and self.usage.requests >= self.max_requests:
            self.halted = BudgetExhausted(f"teacher.max_requests ({self.max_requests}) reached",
                                          self.usage)
        if self.halted is None and self.budget_usd is not None \
                and self.usage.cost_usd >= self.budget_usd:
            self.halted = BudgetExhausted(f"teacher.budget_usd (${self.budget_usd}) reached",
                                          self.usage)
        if self.halted is not None:
            raise self.halted
        self.usage.requests += 1

    async def _send(self, request: Request):
        import litellm

        litellm.suppress_debug_info = True  # our errors say what happened; theirs add banners

        kwargs = {"messages": list(request.messages), **request.params()}
        for attempt in range(self.max_retries + 1):
            try:
                return await self.route.acompletion(**kwargs)
            except Exception as exc:  # noqa: BLE001 (litellm maps every provider error onto its own classes)
                self._halt_unless_retryable(exc, attempt)
                await asyncio.sleep(self.backoff.delay(attempt, _retry_after(exc)))

    def _halt_unless_retryable(self, exc: Exception, attempt: int) -> None:
        """Return when `exc` is worth another attempt; else halt the build with it."""
        if not _retryable(exc):
            self.halted = StageError(
                "generate", f"the teacher refused a request: {_describe(exc)}", _hint(exc))
            raise self.halted from None
        if attempt == self.max_retries:
            self.halted = StageError(
                "generate", f"teacher request failed after {attempt + 1} attempts: "
                f"{_describe(exc)}; {self.usage.describe()}",
                "completed requests are cached; rerun when the provider recovers, "
                "or raise teacher.max_retries / teacher.timeout_s")
            raise self.halted from None

    def _reply(self, key: str, model: str, response) -> Reply:
        import litellm

        choice = response.choices[0]
        message = choice.message
        usage = getattr(response, "usage", None)
        # litellm prices every response while logging it; pricing it again costs ~3 ms.
        cost = (getattr(response, "_hidden_params", None) or {}).get("response_cost")
        if cost is None:
            try:
                cost = litellm.completion_cost(completion_response=response)
            except Exception:  # noqa: BLE001 (a model missing from litellm's price map costs 0, as documented)
                cost = 0.0
        cost = float(cost or 0.0)
        return Reply(key=key, model=model, content=message.content,
                     tool_calls=_tool_calls(getattr(message, "tool_calls", None)),
                     logprobs=_logprobs(getattr(choice, "logprobs", None)), cost_usd=cost,
                     prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                     completion_tokens=getattr(usage, "completion_tokens", 0) or 0)


def cached_reply(key: str, hit: dict, model: str | None = None) -> Reply | None:
    """A cached answer as a Reply (from `model` unless the row says); None (ask again) for a
    row whose fields were edited away."""
    try:
        return Reply(key=key, cached=True, **{**hit, "model": hit.get("model") or model})
    except TypeError:
        return None


class Direct:
    """One model at one endpoint, called through `litellm.acompletion` (no Router)."""

    def __init__(self, model: str, api_base: str | None, api_key: str | None, *,
                 timeout_s: float):
        self.model = model
        self._fixed: dict[str, Any] = {"model": model, "timeout": timeout_s,
                                       "num_retries": 0, "max_retries": 0}
        if api_base:
            self._fixed["api_base"] = api_base
        if api_key:
            self._fixed["api_key"] = api_key

    async def acompletion(self, **kwargs) -> Any:
        import litellm

        return await litellm.acompletion(**self._fixed, **kwargs)

    def served_by(self, response) -> str:
        return self.model


def _retryable(exc: Exception) -> bool:
    import litellm

    if getattr(exc, "retryable", None) is not None:  # errors that know (teacher/batch.py)
        return exc.retryable
    if isinstance(exc, (litellm.RateLimitError, litellm.Timeout, litellm.APIConnectionError,
                        asyncio.TimeoutError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (408, 429))


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or getattr(exc, "litellm_response_headers", None)
    value = headers.get("retry-after") if headers else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}" + (f" {status}" if status else "") + f": {text[:300]}"


def _hint(exc: Exception) -> str:
    import litellm

    if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
        return "check the API key in the variable named by teacher.api_key_env"
    if isinstance(exc, litellm.NotFoundError):
        return "check teacher.model and teacher.api_base"
    return "check teacher.model supports the request (structured output, logprobs, tools)"


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _tool_calls(calls) -> list[dict] | None:
    if not calls:
        return None
    out = []
    for call in calls:
        fn = _field(call, "function")
        arguments = _field(fn, "arguments")
        out.append({"id": _field(call, "id"), "type": "function",
                    "function": {"name": _field(fn, "name"),
                                 "arguments": arguments if isinstance(arguments, str)
                                 else json.dumps(arguments)}})
    return out


def _logprobs(logprobs) -> list[dict] | None:
    content = _field(logprobs, "content") if logprobs is not None else None
    if not content:
        return None
    return [{"token": _field(t, "token"), "logprob": _field(t, "logprob"),
             "top": [[_field(a, "token"), _field(a, "logprob")]
                     for a in (_field(t, "top_logprobs") or [])]} for t in content]


__all__ = ["AnswerKeys", "Backoff", "BadReply", "BudgetExhausted", "Direct", "Reply", "Request",
           "Teacher", "Usage", "cached_reply", "json_schema_format", "parse_json"]


async def gather_or_cancel(coros) -> list:
    """gather(), stopping every task on the first failure.

    After a stage error (budget spent, provider down) the teacher refuses new requests, so
    the other tasks are drained: what is already in flight is paid for and gets cached.
    Anything else (Ctrl-C, a bug) cancels them at once.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except DistillError:
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
