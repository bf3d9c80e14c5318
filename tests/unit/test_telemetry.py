"""OpenTelemetry spans of `distill serve`, read back from the SDK's in-memory exporter: the
GenAI semantic conventions, the cascade's attributes, a child span per teacher call; and no
opentelemetry import at all unless the OTEL_EXPORTER_OTLP_* variables ask for spans."""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_server import bundle_dir, running, teacher  # noqa: F401  (its fixtures, reused)
from tiny_causal import write_causal_bundle

from distill_compiler.serve import telemetry

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", reason="spans need the [otel] extra")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402


@pytest.fixture
def recorded():
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    spans = telemetry.OtelTelemetry(provider.get_tracer("test"), "harbor", "ab" * 32)
    return spans, exporter


def test_completion_spans_follow_the_genai_conventions(bundle_dir, recorded):  # noqa: F811
    spans, exporter = recorded
    with running(bundle_dir, spans=spans) as c:
        c.chat("charged twice")
        c.chat("sue me invoice")
    student, teacher_call, escalated = exporter.get_finished_spans()
    assert (student.name, student.kind) == ("chat any", SpanKind.SERVER)
    assert dict(student.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "distill",
        "gen_ai.request.model": "any", "gen_ai.response.model": bundle_dir.name,
        "gen_ai.response.finish_reasons": ("stop",), "gen_ai.usage.input_tokens": 0,
        "gen_ai.usage.output_tokens": 0, "distill.route": "student",
        "distill.reason": "confidence 0.83 >= 0.60", "distill.confidence": 0.8339,
        "distill.bundle.name": "harbor", "distill.bundle.spec_sha256": "ab" * 32}
    assert (teacher_call.name, teacher_call.kind) == ("chat openai/fake-teacher", SpanKind.CLIENT)
    assert teacher_call.parent.span_id == escalated.context.span_id
    assert teacher_call.attributes["gen_ai.provider.name"] == "openai"
    assert teacher_call.attributes["gen_ai.usage.output_tokens"] == 8
    assert escalated.attributes["distill.route"] == "teacher"
    assert escalated.attributes["gen_ai.response.model"] == "openai/fake-teacher"
    assert escalated.attributes["gen_ai.usage.output_tokens"] == 8


def test_tool_calls_are_on_the_span(tmp_path, exported_causal, recorded):
    spans, exporter = recorded
    agent = write_causal_bundle(tmp_path / "agent", exported_causal, "agent",
                                {"model": None, "api_base": None, "api_key_env": None})
    with running(agent, spans=spans) as c:
        _, _, body = c.chat("where is order A15")
    [span] = exporter.get_finished_spans()
    [call] = body["choices"][0]["message"]["tool_calls"]
    assert span.attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)
    assert span.attributes["gen_ai.tool.name"] == "get_order"
    assert span.attributes["gen_ai.tool.call.id"] == call["id"]
    assert span.attributes["gen_ai.usage.output_tokens"] > 5
    assert [e.name for e in span.events] == ["gen_ai.tool.call"]


def test_the_otlp_variables_turn_spans_on():
    spans, note = telemetry.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
                                     "harbor", None)
    assert isinstance(spans, telemetry.OtelTelemetry) and note is None
    spans.shutdown()
    quiet, note = telemetry.from_env({}, "harbor", None)
    assert type(quiet) is telemetry.Telemetry and note is None


def test_without_the_variables_nothing_of_opentelemetry_is_imported(bundle_dir):  # noqa: F811
    code = ("import sys\nfrom distill_compiler.serve import server\n"
            f"server.build_service({str(bundle_dir)!r}, threads=1, env={{}})\n"
            "print([m for m in sys.modules if m.startswith('opentelemetry')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
