"""OpenTelemetry spans for completions, following the GenAI semantic conventions.

With the `[otel]` extra installed and an `OTEL_EXPORTER_OTLP_*` variable set (the standard
ones: `OTEL_EXPORTER_OTLP_ENDPOINT`, `..._TRACES_ENDPOINT`, `..._HEADERS`; OTLP over
HTTP/protobuf), every completion emits a span `chat {gen_ai.request.model}` with
`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.model`,
`gen_ai.response.model`, `gen_ai.response.finish_reasons`, `gen_ai.usage.input_tokens` /
`output_tokens`, the tool calls (`gen_ai.tool.name`, `gen_ai.tool.call.id`: attributes when
there is one call, an event per call), and the cascade's `distill.route`, `distill.reason`,
`distill.confidence`, `distill.bundle.name` and `distill.bundle.spec_sha256`. A teacher call is
a child span `chat {teacher model}` with the teacher's provider, usage and cost.

Without those variables nothing of opentelemetry is imported; with them but without the extra,
the server says so once and serves without spans.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Mapping

PROVIDER = "distill"  # gen_ai.provider.name of the student's answers


class CompletionSpan:
    """What a handler records on its completion's span; does nothing without telemetry."""

    def __init__(self, span=None):
        self.span = span

    def record(self, reply, response_model: str) -> None:
        if self.span is None:
            return
        info, usage = reply.info, reply.usage
        attrs = {"gen_ai.response.model": response_model,
                 "gen_ai.response.finish_reasons": [reply.finish_reason],
                 "gen_ai.usage.input_tokens": usage.get("prompt_tokens", 0),
                 "gen_ai.usage.output_tokens": usage.get("completion_tokens", 0),
                 "distill.route": info["route"], "distill.reason": info["reason"]}
        if info.get("confidence") is not None:
            attrs["distill.confidence"] = float(info["confidence"])
        calls = reply.message.get("tool_calls") or ()
        if len(calls) == 1:
            attrs["gen_ai.tool.name"] = calls[0]["function"]["name"]
            attrs["gen_ai.tool.call.id"] = calls[0]["id"]
        for call in calls:
            self.span.add_event("gen_ai.tool.call", {"gen_ai.tool.name": call["function"]["name"],
                                                     "gen_ai.tool.call.id": call["id"]})
        self.span.set_attributes(attrs)

    def teacher(self, answer, model: str) -> None:
        if self.span is None:
            return
        attrs = {"gen_ai.response.model": model,
                 "gen_ai.response.finish_reasons": [answer.finish_reason],
                 "gen_ai.usage.input_tokens": answer.usage["prompt_tokens"],
                 "gen_ai.usage.output_tokens": answer.usage["completion_tokens"]}
        if answer.cost_usd is not None:
            attrs["distill.teacher.cost_usd"] = answer.cost_usd
        self.span.set_attributes(attrs)


class Telemetry:
    """No spans: the default, and what runs without the extra."""

    @contextmanager
    def completion(self, request_model: str):
        yield CompletionSpan()

    @contextmanager
    def teacher_call(self, model: str, provider: str | None):
        yield CompletionSpan()

    def shutdown(self) -> None:
        pass


class OtelTelemetry(Telemetry):
    """Spans from `tracer` (an opentelemetry Tracer), tagged with the bundle's identity."""

    def __init__(self, tracer, bundle_name: str, spec_sha256: str | None, provider=None):
        from opentelemetry.trace import SpanKind

        self.tracer, self.kind, self.provider = tracer, SpanKind, provider
        self.bundle = {"distill.bundle.name": bundle_name}
        if spec_sha256:
            self.bundle["distill.bundle.spec_sha256"] = spec_sha256

    @contextmanager
    def completion(self, request_model: str):
        with self.tracer.start_as_current_span(f"chat {request_model}", kind=self.kind.SERVER,
                                               attributes=self._request(request_model, PROVIDER)
                                               ) as span:
            yield CompletionSpan(span)

    @contextmanager
    def teacher_call(self, model: str, provider: str | None):
        with self.tracer.start_as_current_span(f"chat {model}", kind=self.kind.CLIENT,
                                               attributes=self._request(model, provider or "unknown")
                                               ) as span:
            yield CompletionSpan(span)

    def _request(self, model: str, provider: str) -> dict:
        return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                "gen_ai.request.model": model, **self.bundle}

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes the batch processor


def from_env(env: Mapping[str, str], bundle_name: str,
             spec_sha256: str | None) -> tuple[Telemetry, str | None]:
    """Telemetry as the OTEL_EXPORTER_OTLP_* variables ask, and a note for the operator when
    they ask for what is not installed."""
    if not any(k.startswith("OTEL_EXPORTER_OTLP_") for k in env):
        return Telemetry(), None
    missing = [m for m in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
               if not _installed(m)]
    if missing:
        return Telemetry(), ("OTEL_EXPORTER_OTLP_* is set but the [otel] extra is not installed "
                             "(pip install 'distill-compiler[otel]'): serving without spans")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or "distill-serve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("distill_compiler.serve")
    return OtelTelemetry(tracer, bundle_name, spec_sha256, provider), None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
