"""`distill serve`: a bundle of any task behind an OpenAI-compatible HTTP API (starlette on
uvicorn).

    POST /v1/chat/completions   classify: the last user message is the input, the answer a
                                label (classify.py); extract and agent: the decoder student
                                with tools, tool_choice and response_format (causal.py);
                                `stream: true` as server-sent chunks (openai_format.py)
    GET  /v1/models             the bundle's name
    GET  /health                liveness, and whether the teacher can be reached
    GET  /metrics               Prometheus text (metrics.py)

Every completion says how it was answered, in `X-Distill-Route` / `X-Distill-Reason` headers
and a `distill` body field (`route`, `reason`, `confidence`: always the student's). Teacher
routes go through litellm to policy.json's teacher (teacher.py); when it cannot answer, the
request gets the student's answer with route `student-fallback` and a reason, rather than a
502: the service degrades, it does not drop messages.

Nobody spends what is not theirs: with --api-key-env every request needs `Authorization:
Bearer <key>` (401 otherwise; compared in constant time, never logged); --teacher-budget-usd caps
what escalations spend per process; the CLI binds 127.0.0.1 unless told otherwise; the request
log (--request-log) holds no message contents unless --log-contents asks.

Shadow traffic (--shadow-rate, shadow.py) mirrors a share of the student's answers to the
teacher in the background, compares the pairs and raises the drift alarm.

Bounds: bodies over --max-body-bytes get 413; more than --concurrency completions in flight
get 503 with Retry-After; a completion that takes over --request-timeout gets 504. Errors use
the OpenAI error shape. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from ..errors import UsageError
from ..runtime import load_bundle
from ..runtime.classifier import Bundle
from ..runtime.format import REPORT_FILE, InputError
from ..runtime.inputs import parse_json
from . import openai_format, telemetry
from .causal import CausalTask
from .classify import ClassifyTask
from .decode_loop import DecodeLoop
from .escalation_log import AppendLog
from .metrics import CHAT_PATH, Metrics, Observed
from .openai_format import Reply
from .request import ApiError, stream_options
from .shadow import Shadow, ShadowConfig
from .student import StudentPool, Wiring
from .teacher import Budget, TeacherClient


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    concurrency: int = 64
    request_timeout_s: float = 30.0
    teacher_timeout_s: float = 10.0


@dataclass(frozen=True)
class Guard:
    """Who may call and what is written about it."""

    api_key: str | None = None          # the Bearer token every request must carry
    request_log: str | Path | None = None
    log_contents: bool = False          # the request log keeps messages and answers


class Service:
    """The handlers, and what they share: the bundle, its task, the teacher and the counters."""

    def __init__(self, bundle, limits: Limits, teacher: TeacherClient,
                 log: AppendLog | None = None, workers: int = 1, guard: Guard = Guard(),
                 spans: telemetry.Telemetry | None = None,
                 shadow: ShadowConfig | None = None, shadow_log: AppendLog | None = None,
                 batch_rows: int = 1):
        self.bundle, self.limits, self.teacher, self.log = bundle, limits, teacher, log
        self.guard = guard
        self.name = bundle.manifest.get("name") or bundle.root.name
        self.metrics = Metrics()
        self.metrics.budget = teacher.budget
        self.telemetry = spans or telemetry.Telemetry()
        self.student = StudentPool(bundle.predict, workers)
        self.request_log = AppendLog(guard.request_log) if guard.request_log else None
        wiring = Wiring(self.student, teacher, log, self.metrics, self.telemetry)
        if shadow is not None:
            wiring.shadow = Shadow(shadow, wiring, validation_agreement(bundle.root), shadow_log)
        self.shadow = self.metrics.shadow = wiring.shadow
        if isinstance(bundle, Bundle):
            self.decoding = None
            self.task = ClassifyTask(bundle, wiring)
        else:
            # Batched decoding needs a graph that takes positions and a mask (decoder.json);
            # else, and with batch_rows 1, each request decodes alone on a worker thread.
            batches = batch_rows > 1 and bundle.decoder.graph_batches
            self.decoding = DecodeLoop(bundle, batch_rows) if batches else None
            self.task = CausalTask(bundle, wiring, self.decoding)
        self._key = guard.api_key.encode() if guard.api_key else None

    def authorized(self, header: str | None) -> bool:
        if self._key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare_digest takes as long whatever the token: timing says nothing about the key.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key)

    async def chat(self, request: Request) -> Response:
        if self.metrics.in_flight >= self.limits.concurrency:
            raise ApiError(503, f"server busy: {self.limits.concurrency} requests in flight; "
                           "retry shortly", "overloaded", "server_error", {"Retry-After": "1"})
        self.metrics.in_flight += 1
        started = time.perf_counter()
        try:
            body = await self._json_body(request)
            return await asyncio.wait_for(self._complete(body, started),
                                          self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within {self.limits.request_timeout_s:g}s "
                           "(--request-timeout)", "timeout", "server_error") from None
        finally:
            self.metrics.in_flight -= 1

    async def _complete(self, body: Any, started: float) -> Response:
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        with self.telemetry.completion(model or self.name) as span:
            try:
                reply = await self.task.answer(body)
            except ApiError as exc:
                self._log_request(body, None, exc.status, started)
                raise
            span.record(reply, self.teacher.model if reply.route == "teacher" else self.name)
        self.metrics.routes[reply.route] += 1
        self._log_request(body, reply, 200, started)
        headers = {"X-Distill-Route": reply.route, "X-Distill-Reason": _header_safe(reply.info["reason"])}
        stream, include_usage = stream_options(body)
        if stream:
            events = openai_format.sse(openai_format.chunks(reply, self.name, include_usage))
            return StreamingResponse(_replay(events), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return JSONResponse(openai_format.completion(reply, self.name), headers=headers)

    def _log_request(self, body: Any, reply: Reply | None, status: int, started: float) -> None:
        """One request-log line: what happened, and the contents only when asked."""
        if self.request_log is None:
            return
        row: dict[str, Any] = {"time": round(time.time(), 3), "status": status,
                               "ms": round(1000 * (time.perf_counter() - started), 2)}
        if reply is not None:
            row.update(route=reply.route, reason=reply.info["reason"],
                       confidence=reply.info.get("confidence"), finish_reason=reply.finish_reason,
                       usage=reply.usage,
                       tools_called=[c["function"]["name"] for c in reply.message.get("tool_calls") or ()])
        if self.guard.log_contents and isinstance(body, dict):
            row.update(messages=body.get("messages"), tools=body.get("tools"),
                       answer=reply.message if reply else None)
        self.request_log.append(row)

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
            return parse_json(b"".join(chunks))  # runtime/inputs.py: UTF-8, JSON, depth
        except InputError as exc:
            raise ApiError(400, f"{exc} (the request body)", "invalid_json") from None

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": 0, "owned_by": "distill"}]})

    async def health(self, request: Request) -> Response:
        budget = self.teacher.budget
        return JSONResponse({"status": "ok", "model": self.name, **self.task.describe(),
                             "teacher": self.teacher.model,
                             "teacher_unavailable": self.teacher.unavailable,
                             "teacher_spend_usd": round(budget.spent_usd, 6),
                             "teacher_budget_usd": budget.limit_usd,
                             "drift": self.shadow.drifting if self.shadow else None,
                             "in_flight": self.metrics.in_flight,
                             "widest_batch": self.decoding.most_rows if self.decoding else None})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def start(self) -> None:
        if self.shadow is not None:
            self.shadow.start()

    async def stop(self) -> None:
        if self.shadow is not None:
            await self.shadow.stop()
        if self.decoding is not None:
            self.decoding.stop()
        self.student.stop()
        for log in (self.log, self.request_log, self.shadow and self.shadow.log):
            if log is not None:
                log.close()
        self.telemetry.shutdown()


async def _replay(events: list[bytes]):
    for event in events:
        yield event


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)",
                    "body_too_large")


def _header_safe(text: str) -> str:
    """HTTP header values are latin-1 on one line; reasons quote spec text, which may not be."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


class Authorized:
    """ASGI middleware: with an API key set, requests without `Authorization: Bearer <key>`
    get 401 before anything reads their body."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not self.service.authorized(header):
                error = ApiError(401, "missing or wrong API key: send Authorization: Bearer "
                                 "<key> (the server's --api-key-env)", "invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error_response(exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug still answers in the OpenAI error shape (uvicorn logs the traceback), never as a
    plain-text 500 a client cannot parse."""
    return _error_response(ApiError(500, f"internal error ({type(exc).__name__}); the server "
                                    "log has the traceback", "internal_error", "server_error"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                    f"{exc.detail}", code))


def create_app(service: Service):
    """The ASGI app: routes, OpenAI-shaped errors, auth, the student's worker and the metrics."""

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [Route(CHAT_PATH, service.chat, methods=["POST"]),
              Route("/v1/models", service.models, methods=["GET"]),
              Route("/health", service.health, methods=["GET"]),
              Route("/metrics", service.prometheus, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    return Observed(Authorized(app, service), service.metrics)


def build_service(bundle_path: str | Path, *, threads: int | None = None, batch_rows: int = 4,
                  escalation_log: str | Path | None = None, limits: Limits = Limits(),
                  env: Mapping[str, str] | None = None, guard: Guard = Guard(),
                  budget_usd: float | None = None,
                  spans: telemetry.Telemetry | None = None,
                  shadow: ShadowConfig | None = None,
                  shadow_log: str | Path | None = None) -> Service:
    """Load the bundle and wire it to its teacher, logs and telemetry. `threads` requests are
    answered in parallel (default: one per core), each model call on one core; agent and
    extract requests are decoded up to `batch_rows` together instead (decode_loop.py). `spans`
    defaults to what the OTEL_EXPORTER_OTLP_* variables ask for."""
    env = os.environ if env is None else env
    workers = threads or os.cpu_count() or 1
    bundle = load_bundle(bundle_path, threads=1)
    teacher = TeacherClient(bundle.policy.data.get("teacher"), limits.teacher_timeout_s, env,
                            Budget(budget_usd))
    name = bundle.manifest.get("name") or bundle.root.name
    if spans is None:
        spans, note = telemetry.from_env(env, name, bundle.manifest.get("spec_sha256"))
        if note:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    log = AppendLog(escalation_log) if escalation_log else None
    mirrored = AppendLog(shadow_log) if shadow_log else None
    return Service(bundle, limits, teacher, log, workers, guard, spans, shadow, mirrored,
                   batch_rows)


def validation_agreement(root: Path) -> float | None:
    """report.json's agreement with the teacher on the validation traffic the student
    accepted: what mirrored requests (all student-answered) are compared with."""
    try:
        report = json.loads((root / REPORT_FILE).read_text(encoding="utf-8"))
        return float(report["metrics"]["cascade"]["val_accepted_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def api_key_from(env_var: str | None, env: Mapping[str, str]) -> str | None:
    """The key --api-key-env names; a variable that is unset or empty is a usage error (a
    server meant to be locked must not start open)."""
    if env_var is None:
        return None
    key = env.get(env_var, "").strip()
    if not key:
        raise UsageError(f"--api-key-env {env_var}: ${env_var} is not set or empty")
    return key


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
    if service.guard.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without --api-key-env: anyone who reaches this "
              "port can make it call the teacher", file=sys.stderr, flush=True)
    uvicorn_server(service).run(sockets=[sock])
