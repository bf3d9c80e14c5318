"""The closed loop: compile an extract spec whose data the (fake) teacher writes, serve the bundle,
let the server escalate some requests to the teacher and log them, list that log under
`teacher.logs` and recompile. The recompile adds exactly the logged examples, pays the teacher
for nothing it was paid for before, and a compile after it reuses every stage.

The fake OpenAI-compatible teacher (teacher_server.py) is the only double: the compile and the
server reach it through litellm on a real socket, as they would a hosted model."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from teacher_server import FakeTeacher
from tiny_causal import EXTRACT_SCHEMA, extraction

from distill_compiler.pipeline import Project, build, plan
from distill_compiler.spec.load import load_spec

pytestmark = pytest.mark.e2e

KEY_ENV = "LOOP_TEACHER_KEY"
ESCALATED = ["my lawyer says order A11 came broken", "order A12 is late, my lawyer is calling",
             "lawyer here: A13 is the wrong colour and I want a refund"]


def write_spec(root: Path, api_base: str, logs: list[str]) -> Path:
    rows = [{"input": text, "output": target} for text, target in map(extraction, range(40))]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"model": "openai/fake-teacher", "api_base": api_base, "api_key_env": KEY_ENV,
               "temperature": 0, "logs": logs}
    (root / "spec.yaml").write_text(
        "name: loop-extract\ntask: extract\ndescription: Read order problems.\n"
        f"output:\n  schema: {json.dumps(EXTRACT_SCHEMA)}\n"
        "escalation:\n  triggers: [{pattern: '(?i)lawyer'}]\n"
        f"teacher: {json.dumps(teacher)}\n"
        "data:\n  per_intent: 10\n  registers: [formal]\n  near_duplicate_threshold: 1.0\n"
        "student:\n  base: scratch:2x64\n  method: sft\n  epochs: 2\n  learning_rate: 0.003\n"
        "  batch_size: 8\n  max_length: 256\n  patience: 0\n"
        "export:\n  quantize: none\n  max_new_tokens: 32\n  min_parity: 0.01\n")
    return root / "spec.yaml"


def project(root: Path) -> Project:
    spec_path = root / "spec.yaml"
    return Project.of(load_spec(spec_path), spec_path, root / "build", root / "cache")


@contextmanager
def serving(bundle: Path, log: Path):
    """`distill serve` in a thread on a free port, escalations logged to `log`."""
    from distill_compiler.serve.server import build_service, listen, uvicorn_server

    service = build_service(bundle, threads=1, escalation_log=log)
    server, sock = uvicorn_server(service), listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def examples(result) -> list[dict]:
    """The generate stage's examples.jsonl in a build's result."""
    artifact = next(run.artifact for run in result.runs if run.name == "generate")
    return [json.loads(line) for line in artifact.file("examples.jsonl").read_text().splitlines()]


def test_recompiling_with_the_escalation_log_adds_exactly_those_examples(tmp_path, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setenv(KEY_ENV, "sk-test")
    with FakeTeacher() as teacher:
        write_spec(tmp_path, teacher.api_base, ["rows.jsonl"])
        first = build(project(tmp_path))
        before = examples(first)
        paid = first.summary("generate")
        assert paid["teacher_requests"] > paid["cached_requests"] == 0 and teacher.hits > 0

        # Production: triggered requests (and any the student is unsure of) go to the teacher
        # and land in the escalation log.
        log = tmp_path / "escalations.jsonl"
        with serving(tmp_path / "build" / "bundle", log) as base:
            client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
            routes = {text: client.chat.completions.create(
                model="loop-extract", messages=[{"role": "user", "content": text}]).distill["route"]
                for text in ESCALATED + ["my order A14 came broken"]}
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        escalated = [t for t, route in routes.items() if route == "teacher"]
        assert set(ESCALATED) <= set(escalated)
        assert [r["input"] for r in rows] == [{"message": t} for t in escalated]

        write_spec(tmp_path, teacher.api_base, ["rows.jsonl", "escalations.jsonl"])
        reasons = {p.name: p.reasons for p in plan(project(tmp_path))}
        assert any("teacher.logs" in r for r in reasons["generate"])
        hits = teacher.hits
        second = build(project(tmp_path))
        assert teacher.hits == hits  # every generation and answer came from the request cache

    after = examples(second)
    summary = second.summary("generate")
    # teacher_requests counts the paid ones: none now; every earlier one came from the cache.
    assert summary["teacher_requests"] == 0
    assert summary["cached_requests"] == paid["teacher_requests"]
    assert summary["cost_usd"] == 0 and summary["examples"] == len(before) + len(rows)
    old = {json.dumps(e["input"], sort_keys=True) for e in before}
    added = [e for e in after if json.dumps(e["input"], sort_keys=True) not in old]
    assert [e["input"] for e in added] == [r["input"] for r in rows]
    assert [e["target"] for e in added] == [r["output"] for r in rows]
    # Every earlier example is still there, unchanged.
    assert [e for e in after if e not in added] == before
    # Nothing changed since: every stage is reused.
    assert [p.status for p in plan(project(tmp_path))] == ["cached"] * 6
    third = build(project(tmp_path))
    assert all(run.cached for run in third.runs)
