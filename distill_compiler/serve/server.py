"""`distill serve`: a bundle behind an OpenAI-compatible HTTP API (starlette on uvicorn).

    POST /v1/chat/completions   the last user message is the input; the answer is the
                                assistant message (a label, a refusal's response, or the
                                teacher's answer)
    GET  /v1/models             the bundle's name
    GET  /health                liveness, and whether the teacher can be reached
    GET  /metrics               Prometheus text: requests by path and status, answers by
                                route, a latency histogram

The input: a last user message whose content is a JSON object is taken as the whole input;
any other text goes into the input schema's single string property. The input is validated
against the bundle's schema (422 with the schema's message when it fails).

Every completion says how it was answered, in `X-Distill-Route` / `X-Distill-Reason` headers
and a `distill` body field: `{"route", "reason", "label", "confidence"}`, where `confidence`
is always the student's and, on the teacher route, `label` is the teacher's answer mapped
onto the bundle's labels (null when it names none) beside `student_label`.

Teacher routes forward the request's messages through litellm to the teacher in
policy.json. When the request has no system message, a labelling prompt naming the bundle's
labels is put first, so the teacher answers with a label the escalation log can record.
When the teacher cannot answer (no key, unreachable, timed out, an error), the request gets
the student's answer with route `student-fallback` and a reason saying why, rather than a
502: a classifier in front of a support queue should degrade to its own best guess, not drop
the message; clients that must not accept it can check the route. No retries: the client
is waiting.

Bounds: bodies over --max-body-bytes get 413; more than --concurrency completions in flight
get 503 with Retry-After; a completion that takes over --request-timeout gets 504 (teacher
calls have their own, shorter, --teacher-timeout). Errors use the OpenAI error shape.

Nothing here imports torch. litellm is imported on a worker thread the first time a request
escalates, so a bundle that never escalates never loads it and the event loop never stalls on it.
"""

from __future__ import annotations

import asyncio
import bisect
import importlib
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import UsageError
from ..runtime import load_bundle
from ..runtime.classifier import Bundle
from ..runtime.format import BundleError, InputError
from ..runtime.inputs import parse_json
from ..teacher.labels import label_of
from .escalation_log import EscalationLog, classify_row

CHAT_PATH = "/v1/chat/completions"
PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    concurrency: int = 64
    request_timeout_s: float = 30.0
    teacher_timeout_s: float = 10.0


class ApiError(Exception):
    """A request the server refuses; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "code": self.code}}, self.status, headers=self.headers)


# --------------------------------------------------------------------------- request -> input

def user_input(body: Any, bundle: Bundle) -> dict:
    """The bundle input a chat completion request carries in its last user message."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    if body.get("stream"):
        raise ApiError(400, "stream is not supported: a classification answer is one short "
                       "message", "stream_unsupported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty array of chat messages",
                       "missing_messages")
    user = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
                None)
    if user is None:
        raise ApiError(400, "`messages` has no user message to classify", "missing_messages")
    text = content_text(user.get("content"))
    value = _json_object(text)
    if value is not None:
        return value
    field = bundle.policy.text_field
    if field is None:
        raise ApiError(422, "this bundle's input has several fields: send the last user "
                       "message's content as a JSON object matching the input schema",
                       "input_schema")
    return {field: text}


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise ApiError(400, "the user message's content must be a string or a list of text parts",
                   "invalid_content")


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not an object after all: the text is the input
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- student

class StudentPool:
    """Runs the student on a pool of worker threads, one request per model call.

    onnxruntime releases the GIL, so `workers` requests run in parallel, each on one
    intra-op thread. Batching concurrent requests was measured and lost on CPU: int8 models
    pay for padding to the batch's longest input (on the harbor bundle, 145 single requests/s
    against 90/s in batches of 32, on one core).
    """

    def __init__(self, bundle: Bundle, workers: int):
        self.bundle = bundle
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="distill-student")

    async def predict(self, input: dict) -> dict:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self.bundle.predict, input)

    def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- teacher

class TeacherUnavailable(Exception):
    """The teacher cannot answer this request; the message says why (never with the key)."""


class TeacherClient:
    """The teacher named in policy.json, called through litellm."""

    def __init__(self, config: Mapping | None, timeout_s: float, env: Mapping[str, str]):
        config = config or {}
        self.model: str | None = config.get("model")
        self.api_base: str | None = config.get("api_base")
        self.timeout_s = timeout_s
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

    async def complete(self, messages: list[dict]) -> tuple[str, dict]:
        """The teacher's answer text and its token usage."""
        if self.unavailable:
            raise TeacherUnavailable(self.unavailable)
        litellm = await self._load()
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0.0,
                                  "timeout": self.timeout_s, "num_retries": 0, "max_retries": 0}
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
        content = response.choices[0].message.content
        if not content:
            raise TeacherUnavailable("the teacher returned no content")
        usage = getattr(response, "usage", None)
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        return content, {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}

    async def _load(self):
        async with self._import_lock:
            if self._litellm is None:
                # Importing litellm takes seconds; on the event loop it would stall every request.
                litellm = await asyncio.to_thread(importlib.import_module, "litellm")
                litellm.suppress_debug_info = True
                self._litellm = litellm
        return self._litellm


def labelling_prompt(labels: list[str]) -> dict:
    """The system message put before requests that have none, in the shape of label.j2."""
    lines = "\n".join(f"- {label}: {label.replace('_', ' ')}" for label in labels)
    return {"role": "system", "content": "You route each user message to exactly one label.\n"
            f"Labels:\n{lines}\nAnswer with the label name only, exactly as written above: "
            "no punctuation, no explanation."}


# --------------------------------------------------------------------------- metrics

class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format."""

    def __init__(self):
        self.responses: Counter[tuple[str, int]] = Counter()
        self.routes: Counter[str] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter[str] = Counter()
        self.in_flight = 0
        self.escalation_lines = 0

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        self.responses[(path, status)] += 1
        counts = self.buckets.setdefault(path, [0] * (len(LATENCY_BUCKETS_S) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sums[path] += seconds

    def render(self) -> str:
        out = ["# HELP distill_http_requests_total HTTP requests by path and status.",
               "# TYPE distill_http_requests_total counter"]
        out += [f'distill_http_requests_total{{path="{p}",status="{s}"}} {n}'
                for (p, s), n in sorted(self.responses.items())]
        out += ["# HELP distill_http_errors_total HTTP responses with status >= 400, by status.",
                "# TYPE distill_http_errors_total counter"]
        errors = Counter()
        for (_, status), n in self.responses.items():
            if status >= 400:
                errors[status] += n
        out += [f'distill_http_errors_total{{status="{s}"}} {n}' for s, n in sorted(errors.items())]
        out += ["# HELP distill_completions_total Answered completions by route.",
                "# TYPE distill_completions_total counter"]
        out += [f'distill_completions_total{{route="{r}"}} {n}' for r, n in sorted(self.routes.items())]
        out += ["# HELP distill_request_duration_seconds Request latency by path.",
                "# TYPE distill_request_duration_seconds histogram"]
        for path, counts in sorted(self.buckets.items()):
            running = 0
            for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'distill_request_duration_seconds_bucket{{path="{path}",le="{le}"}} '
                           f"{running}")
            out.append(f'distill_request_duration_seconds_sum{{path="{path}"}} {self.sums[path]:.6f}')
            out.append(f'distill_request_duration_seconds_count{{path="{path}"}} {running}')
        out += ["# HELP distill_in_flight Completions being answered now.",
                "# TYPE distill_in_flight gauge", f"distill_in_flight {self.in_flight}",
                "# HELP distill_escalation_log_lines_total Lines appended to the escalation log.",
                "# TYPE distill_escalation_log_lines_total counter",
                f"distill_escalation_log_lines_total {self.escalation_lines}"]
        return "\n".join(out) + "\n"


class Observed:
    """ASGI middleware: times every HTTP request and counts it by path and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - started)


# --------------------------------------------------------------------------- the service

class Service:
    """The handlers, and what they share: the bundle, the teacher, the log and the counters."""

    def __init__(self, bundle: Bundle, limits: Limits, teacher: TeacherClient,
                 log: EscalationLog | None = None, workers: int = 1):
        self.bundle, self.limits, self.teacher, self.log = bundle, limits, teacher, log
        self.name = bundle.manifest.get("name") or bundle.root.name
        self.student = StudentPool(bundle, workers)
        self.metrics = Metrics()

    async def chat(self, request: Request) -> Response:
        if self.metrics.in_flight >= self.limits.concurrency:
            raise ApiError(503, f"server busy: {self.limits.concurrency} requests in flight; "
                           "retry shortly", "overloaded", "server_error", {"Retry-After": "1"})
        self.metrics.in_flight += 1
        try:
            return await asyncio.wait_for(self._complete(request), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within {self.limits.request_timeout_s:g}s "
                           "(--request-timeout)", "timeout", "server_error") from None
        finally:
            self.metrics.in_flight -= 1

    async def _complete(self, request: Request) -> Response:
        body = await self._json_body(request)
        input = user_input(body, self.bundle)
        try:
            self.bundle.policy.check_input(input)
        except InputError as exc:
            raise ApiError(422, str(exc), "input_schema") from None  # runtime/inputs.py
        result = await self.student.predict(input)
        info = {"route": result["route"], "reason": result["reason"], "label": result["label"],
                "confidence": round(result["confidence"], 4)}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        if result["route"] == "teacher":
            content, usage, info = await self._escalate(body["messages"], input, result, info)
        else:
            content = result["output"].get("response") or result["label"]
        self.metrics.routes[info["route"]] += 1
        return JSONResponse(self._completion(content, info, usage),
                            headers={"X-Distill-Route": info["route"],
                                     "X-Distill-Reason": _header_safe(info["reason"])})

    async def _escalate(self, messages: list, input: dict, result: dict,
                        info: dict) -> tuple[str, dict, dict]:
        if not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages = [labelling_prompt(self.bundle.labels), *messages]
        try:
            content, usage = await self.teacher.complete(messages)
        except TeacherUnavailable as exc:
            info = {**info, "route": "student-fallback",
                    "reason": f"{result['reason']}; teacher unavailable: {exc}"}
            return result["label"], {"prompt_tokens": 0, "completion_tokens": 0,
                                     "total_tokens": 0}, info
        label = label_of(content, tuple(self.bundle.labels))
        if self.log is not None:
            self.log.append(classify_row(
                input, label or content.strip().splitlines()[0], reason=result["reason"],
                student_label=result["label"], student_confidence=result["confidence"],
                model=self.teacher.model))
            self.metrics.escalation_lines += 1
        return content, usage, {**info, "label": label, "student_label": result["label"]}

    async def _json_body(self, request: Request) -> Any:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        try:
            return parse_json(b"".join(chunks))
        except InputError as exc:
            raise ApiError(400, f"{exc} (the request body)", "invalid_json") from None

    def _completion(self, content: str, info: dict, usage: dict) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "distill": info}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "distill"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.name, "labels": self.bundle.labels,
                             "teacher": self.teacher.model,
                             "teacher_unavailable": self.teacher.unavailable,
                             "in_flight": self.metrics.in_flight})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)",
                    "body_too_large")


def _header_safe(text: str) -> str:
    """HTTP header values are latin-1 on one line; reasons quote spec text, which may not be."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug still answers in the OpenAI error shape (uvicorn logs the traceback), never as a
    plain-text 500 a client cannot parse."""
    return ApiError(500, f"internal error ({type(exc).__name__}); the server log has the "
                    "traceback", "internal_error", "server_error").response()


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                    code).response()


def create_app(service: Service):
    """The ASGI app: routes, OpenAI-shaped errors, the student's worker and the metrics."""

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            service.student.stop()
            if service.log is not None:
                service.log.close()

    routes = [Route(CHAT_PATH, service.chat, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    return Observed(app, service.metrics)


def build_service(bundle_path: str | Path, *, threads: int | None = None,
                  escalation_log: str | Path | None = None, limits: Limits = Limits(),
                  env: Mapping[str, str] | None = None) -> Service:
    """Load the bundle and wire it to its teacher and escalation log. `threads` requests are
    answered in parallel (default: one per core), each model call on one core."""
    workers = threads or os.cpu_count() or 1
    bundle = load_bundle(bundle_path, threads=1)
    if not isinstance(bundle, Bundle):
        raise BundleError(f"{bundle_path}: distill serve answers classify bundles; this one is "
                          f"{bundle.policy.task} (use distill_compiler.runtime.load_bundle in your "
                          "service, or `distill run`)")
    teacher = TeacherClient(bundle.policy.data.get("teacher"), limits.teacher_timeout_s,
                            os.environ if env is None else env)
    log = EscalationLog(escalation_log) if escalation_log else None
    return Service(bundle, limits, teacher, log, workers)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets that do, and without it
    # uvicorn's two writes per response (head, body) wait out the peer's 40 ms delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(service: Service):
    import uvicorn

    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                            timeout_keep_alive=5, lifespan="on")
    return uvicorn.Server(config)


def serve(service: Service, host: str, port: int) -> None:
    """Serve until interrupted (SIGINT/SIGTERM finish the requests in flight first)."""
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    teacher = (f"teacher {service.teacher.model}" if not service.teacher.unavailable
               else f"no teacher ({service.teacher.unavailable}): escalations fall back to the student")
    log = f"; escalations logged to {service.log.path}" if service.log else ""
    print(f"serving {service.name} on http://{host}:{bound} ({teacher}{log})", file=sys.stderr,
          flush=True)
    uvicorn_server(service).run(sockets=[sock])
