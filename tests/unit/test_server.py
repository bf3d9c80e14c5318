"""`distill serve` on real sockets: the bag-of-words bundle from test_runtime behind the HTTP
server, its teacher route answered by the fake OpenAI-compatible teacher in teacher_server.py."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from teacher_server import FakeTeacher
from test_runtime import knn_detector, policy, write_bundle

from distill_compiler.serve.server import Limits, build_service, listen, uvicorn_server
from distill_compiler.spec.models import Spec
from distill_compiler.teacher.logs import LogReader

KEY_ENV = "FAKE_TEACHER_KEY"
KEYWORDS = {"billing": ["charged", "invoice"], "technical_bug": ["crash"]}


@pytest.fixture(scope="module")
def teacher():
    with FakeTeacher(KEYWORDS) as fake:
        yield fake


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, teacher) -> Path:
    taught = policy(teacher={"model": "openai/fake-teacher", "api_base": teacher.api_base,
                             "api_key_env": KEY_ENV})
    return write_bundle(tmp_path_factory.mktemp("harbor"), taught)


@contextmanager
def running(bundle_dir: Path, env: dict | None = None, log: Path | None = None,
            limits: Limits = Limits(max_body_bytes=4096, teacher_timeout_s=5.0), **options):
    """The server on 127.0.0.1 and a free port, in a thread; yields a client. `options` go to
    build_service (guard, budget_usd, spans)."""
    service = build_service(bundle_dir, threads=1, escalation_log=log, limits=limits,
                            env={KEY_ENV: "sk-test"} if env is None else env, **options)
    server, sock = uvicorn_server(service), listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "the server did not start within 10 s"
    try:
        yield Client(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)


class Client:
    def __init__(self, port: int, timeout: float = 20):
        self.port, self.timeout = port, timeout

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                **kwargs) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {}, **kwargs)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def chat(self, content, **extra) -> tuple[int, dict, dict]:
        body = {"model": "any", "messages": [{"role": "user", "content": content}], **extra}
        status, headers, data = self.request("POST", "/v1/chat/completions",
                                             json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
        return status, headers, json.loads(data)

    def metrics(self) -> dict[str, float]:
        _, _, data = self.request("GET", "/metrics")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in data.decode().splitlines() if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def client(bundle_dir, tmp_path_factory):
    with running(bundle_dir, log=tmp_path_factory.mktemp("log") / "escalations.jsonl") as c:
        yield c


def test_student_route(client):
    status, headers, body = client.chat("charged twice")
    assert status == 200
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == (
        "student", "confidence 0.83 >= 0.60")
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "billing"}
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert body["distill"] == {"route": "student", "reason": "confidence 0.83 >= 0.60",
                               "label": "billing", "confidence": 0.8339}  # e^3 / (e^3 + 4)


def test_refusal_route_answers_with_the_fixed_response(client):
    status, headers, body = client.chat("help contract")
    assert status == 200 and headers["x-distill-route"] == "refusal"
    assert body["choices"][0]["message"]["content"] == "I can't help with legal questions."
    assert body["distill"]["label"] == "legal_advice"


def test_json_object_content_and_text_parts_are_inputs(client):
    _, _, as_object = client.chat(json.dumps({"message": "my login password"}))
    parts = [{"type": "text", "text": "my login password"}]
    _, _, as_parts = client.chat(parts)
    assert as_object["distill"]["label"] == as_parts["distill"]["label"] == "password_reset"


def test_trigger_goes_to_the_teacher_and_is_logged(client, teacher, bundle_dir, tmp_path):
    teacher.reset_counts()
    status, headers, body = client.chat("sue me invoice")
    assert status == 200
    assert (headers["x-distill-route"], headers["x-distill-reason"]) == (
        "teacher", "trigger: legal threat")
    assert body["choices"][0]["message"]["content"] == "billing"  # the fake teacher's answer
    assert body["distill"]["label"] == "billing" and body["usage"]["total_tokens"] > 0
    sent = teacher.bodies[-1]
    assert sent["model"] == "fake-teacher" and sent["messages"][-1] == {
        "role": "user", "content": "sue me invoice"}
    assert "- technical_bug: technical bug" in sent["messages"][0]["content"]  # labelling prompt


def test_concurrent_escalations_append_whole_lines_the_log_reader_replays(bundle_dir, tmp_path):
    log = tmp_path / "escalations.jsonl"
    messages = [f"the crash {'please ' * i}" for i in range(12)] + ["sue me invoice"] * 4
    with running(bundle_dir, log=log) as c:
        results = [None] * len(messages)

        def ask(i: int) -> None:
            results[i] = c.chat(messages[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(messages))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert {r[1]["x-distill-route"] for r in results} == {"teacher"}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["input"]["message"] for r in rows) == sorted(messages)
    assert rows[0]["escalation"]["model"] == "openai/fake-teacher"

    spec = Spec.model_validate({
        "name": "tiny", "task": "classify",
        "intents": [{"name": n, "description": n} for n in ("billing", "password_reset",
                                                            "technical_bug")],
        "refusals": [{"name": "legal_advice", "description": "law", "response": "No."}],
        "teacher": {"logs": [log.name]}})
    replayed = LogReader(spec, tmp_path).replay((log.name,))
    assert sorted((r["input"]["message"], r["target"]) for r in replayed) == sorted(
        (m, "billing" if "invoice" in m else "technical_bug") for m in messages)


def test_teacher_without_its_key_falls_back_to_the_student(bundle_dir, teacher):
    teacher.reset_counts()
    with running(bundle_dir, env={}) as c:
        status, headers, body = c.chat("the crash")
        _, _, health = c.request("GET", "/health")
    assert status == 200 and headers["x-distill-route"] == "student-fallback"
    assert body["distill"]["reason"] == ("always escalate: technical_bug; teacher unavailable: "
                                         f"${KEY_ENV} is not set in the server's environment")
    assert body["choices"][0]["message"]["content"] == "technical_bug" and teacher.hits == 0
    assert json.loads(health)["teacher_unavailable"].startswith(f"${KEY_ENV}")


def test_teacher_errors_and_timeouts_fall_back(bundle_dir, teacher, tmp_path):
    log = tmp_path / "escalations.jsonl"
    with running(bundle_dir, log=log, limits=Limits(teacher_timeout_s=0.3)) as c:
        teacher.inject("500")
        _, failed, body = c.chat("the crash")
        assert failed["x-distill-route"] == "student-fallback"
        assert "teacher unavailable: InternalServerError" in body["distill"]["reason"]
        teacher.inject("timeout")
        _, slow, body = c.chat("the crash")
        assert slow["x-distill-route"] == "student-fallback"
        assert body["distill"]["reason"].endswith("teacher unavailable: no answer within 0.3s")
    assert not log.exists() or log.read_text() == ""  # nothing learned from no answer


def test_request_errors_use_the_openai_error_shape(client):
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (json.dumps({"model": "x"}).encode(), 400, "missing_messages"),
        (json.dumps({"messages": [{"role": "system", "content": "hi"}]}).encode(), 400,
         "missing_messages"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 300}]}).encode(), 422,
         "input_schema"),
        (json.dumps({"messages": [{"role": "user", "content": '{"msg": "hi"}'}]}).encode(), 422,
         "input_schema"),
    ]
    for data, status, code in cases:
        got, _, body = client.request("POST", "/v1/chat/completions", data)
        error = json.loads(body)["error"]
        assert (got, error["code"], error["type"]) == (status, code, "invalid_request_error"), data
    _, _, body = client.request("POST", "/v1/chat/completions", cases[4][0])
    assert "$.message" in json.loads(body)["error"]["message"]  # the schema's own message


def test_oversized_bodies_get_413_with_and_without_content_length(client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    status, _, body = client.request("POST", "/v1/chat/completions", big)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    status, _, _ = client.request("POST", "/v1/chat/completions", iter([big[:3000], big[3000:]]),
                                  encode_chunked=True)
    assert status == 413


def test_busy_server_answers_503_and_slow_requests_504(bundle_dir, teacher):
    limits = Limits(concurrency=1, request_timeout_s=0.5, teacher_timeout_s=5.0)
    with running(bundle_dir, limits=limits) as c:
        teacher.inject("timeout")  # the fake stalls 1 s: past the request timeout
        slow = {}
        thread = threading.Thread(target=lambda: slow.update(r=c.chat("the crash")))
        thread.start()
        deadline = time.monotonic() + 5
        while json.loads(c.request("GET", "/health")[2])["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, body = c.chat("charged twice")
        thread.join(10)
    assert (status, headers["retry-after"], body["error"]["code"]) == (503, "1", "overloaded")
    assert slow["r"][0] == 504 and slow["r"][2]["error"]["code"] == "timeout"


def test_models_health_and_unknown_paths(client, bundle_dir):
    status, _, body = client.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [bundle_dir.name]
    status, _, body = client.request("GET", "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["teacher_unavailable"] is None
    status, _, body = client.request("GET", "/v2/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    status, _, _ = client.request("GET", "/v1/chat/completions")
    assert status == 405


def test_metrics_count_routes_statuses_and_latency(bundle_dir):
    with running(bundle_dir) as c:
        c.chat("charged twice")
        c.chat("charged twice")
        c.chat("help contract")
        c.chat("sue me invoice")
        c.request("POST", "/v1/chat/completions", b"{")
        m = c.metrics()
    chat = 'path="/v1/chat/completions"'
    assert m[f'distill_http_requests_total{{{chat},status="200"}}'] == 4
    assert m[f'distill_http_requests_total{{{chat},status="400"}}'] == 1
    assert m['distill_http_errors_total{status="400"}'] == 1
    assert m['distill_completions_total{route="student"}'] == 2
    assert m['distill_completions_total{route="refusal"}'] == 1
    assert m['distill_completions_total{route="teacher"}'] == 1
    assert m[f'distill_request_duration_seconds_count{{{chat}}}'] == 5
    assert m[f'distill_request_duration_seconds_bucket{{{chat},le="+Inf"}}'] == 5
    assert 0 < m[f'distill_request_duration_seconds_sum{{{chat}}}'] < 30


def test_out_of_scope_is_answered_without_the_teacher_and_its_share_exported(teacher, tmp_path):
    taught = policy(format=2, out_of_scope=knn_detector(),
                    teacher={"model": "openai/fake-teacher", "api_base": teacher.api_base,
                             "api_key_env": KEY_ENV})
    root = write_bundle(tmp_path / "ood", taught, embedding=True)
    asked = teacher.hits
    with running(root) as c:
        status, headers, body = c.chat("write me a Python function that sorts a list")
        for _ in range(3):
            c.chat("charged twice")
        m = c.metrics()
    assert status == 200 and headers["x-distill-route"] == "out_of_scope"
    assert body["choices"][0]["message"]["content"] == "out_of_scope"
    assert body["distill"]["out_of_scope_score"] == 1.0
    assert body["distill"]["reason"].startswith("out of scope: knn score 1 > 0.5")
    assert teacher.hits == asked  # "charged twice" is answered by the student too
    assert m['distill_completions_total{route="out_of_scope"}'] == 1
    assert m["distill_out_of_scope_rate"] == 0.25
    assert m["distill_out_of_scope_false_rate"] == 0.02
    # No validated recall in this bundle: R is taken as 1, the share a lower bound.
    assert m['distill_out_of_scope_share_estimate{recall="assumed_1"}'] == pytest.approx(
        (0.25 - 0.02) / 0.98, rel=1e-5)
    assert 0 < m['distill_accepted_accuracy_estimate{recall="assumed_1"}'] < 1


def test_openai_client_talks_to_it(client, bundle_dir):
    openai = pytest.importorskip("openai", reason="the OpenAI client comes with litellm; absent in a runtime-only install")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{client.port}/v1", api_key="unused")
    reply = api.chat.completions.with_raw_response.create(
        model=bundle_dir.name, messages=[{"role": "user", "content": "my login password"}])
    assert reply.headers["x-distill-route"] == "student"
    assert reply.parse().choices[0].message.content == "password_reset"


def test_the_cli_server_process_never_imports_torch(bundle_dir, tmp_path):
    """`distill serve` in its own process, escalating once (which loads litellm)."""
    stderr = tmp_path / "stderr.txt"
    env = {**os.environ, KEY_ENV: "sk-test"}
    code = "from distill_compiler.cli import main; main()"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-c", code, "serve",
                                 str(bundle_dir), "--port", "0"], stderr=err, env=env)
    try:
        # Generous limits: the process imports onnxruntime to start and litellm on the first
        # escalation, which take many seconds on a loaded 2-core machine.
        deadline = time.monotonic() + 90
        while not (m := re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)", stderr.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-2000:]
            time.sleep(0.05)
        c = Client(int(m.group(1)), timeout=90)
        assert c.chat("charged twice")[1]["x-distill-route"] == "student"
        assert c.chat("sue me invoice")[1]["x-distill-route"] == "teacher"
    finally:
        proc.terminate()
        proc.wait(15)
    # Top-level packages of every module imported, on any thread.
    packages = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in stderr.read_text().splitlines() if line.startswith("import time:")}
    assert {"litellm", "onnxruntime"} <= packages
    assert not {"torch", "transformers"} & packages


def test_keep_alive_responses_do_not_wait_for_delayed_acks(client):
    """Head and body go out in two writes; without TCP_NODELAY each response stalls ~40 ms."""
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
    started = time.perf_counter()
    for _ in range(20):
        conn.request("GET", "/health")
        conn.getresponse().read()
    conn.close()
    assert time.perf_counter() - started < 0.6


# --------------------------------------------------------------------------- who may spend

def test_api_key_is_needed_on_every_path_and_never_logged(bundle_dir, tmp_path):
    from distill_compiler.serve.server import Guard

    openai = pytest.importorskip("openai", reason="the OpenAI client comes with litellm")
    log = tmp_path / "requests.jsonl"
    key = "sk-serve-0123456789"
    with running(bundle_dir, guard=Guard(api_key=key, request_log=log)) as c:
        for path in ("/v1/models", "/health", "/metrics"):
            status, headers, body = c.request("GET", path)
            assert (status, headers["www-authenticate"]) == (401, "Bearer"), path
            assert json.loads(body)["error"]["code"] == "invalid_api_key"
        wrong = c.request("GET", "/health", headers={"Authorization": f"Bearer {key[:-1]}x"})
        right = c.request("GET", "/health", headers={"Authorization": f"Bearer {key}"})
        assert (wrong[0], right[0]) == (401, 200)
        base = f"http://127.0.0.1:{c.port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="nope", max_retries=0).chat.completions.create(
                model="x", messages=[{"role": "user", "content": "charged twice"}])
        reply = openai.OpenAI(base_url=base, api_key=key).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "charged twice"}])
        assert reply.choices[0].message.content == "billing"
    assert key not in log.read_text() and len(log.read_text().splitlines()) == 1


def test_an_unset_api_key_variable_stops_the_server_from_starting(bundle_dir, capsys):
    from cli_runner import cli

    assert cli("serve", bundle_dir, "--api-key-env", "DISTILL_TEST_UNSET_KEY", "--port", "0") == 2
    assert "$DISTILL_TEST_UNSET_KEY is not set or empty" in capsys.readouterr().err
    assert cli("serve", bundle_dir, "--log-contents") == 2


def test_request_log_holds_no_message_contents_unless_asked(bundle_dir, tmp_path):
    from distill_compiler.serve.server import Guard

    bare, full = tmp_path / "bare.jsonl", tmp_path / "full.jsonl"
    for path, contents in ((bare, False), (full, True)):
        with running(bundle_dir, guard=Guard(request_log=path, log_contents=contents)) as c:
            c.chat("charged twice")
            c.chat("x" * 300)  # refused: 422
    rows = [json.loads(line) for line in bare.read_text().splitlines()]
    assert [(r["status"], r.get("route")) for r in rows] == [(200, "student"), (422, None)]
    assert rows[0]["reason"] == "confidence 0.83 >= 0.60" and rows[0]["ms"] > 0
    assert "charged" not in bare.read_text() and "xxx" not in bare.read_text()
    full_rows = [json.loads(line) for line in full.read_text().splitlines()]
    assert full_rows[0]["messages"][0]["content"] == "charged twice"
    assert full_rows[0]["answer"] == {"role": "assistant", "content": "billing"}


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "openai/fake-teacher"])
def test_teacher_budget_caps_spend_then_the_student_answers(teacher, tmp_path, model):
    """A priced model spends its cost; one litellm cannot price spends the whole cap at once."""
    priced = policy(teacher={"model": model, "api_base": teacher.api_base, "api_key_env": KEY_ENV})
    bundle = write_bundle(tmp_path / "priced", priced)
    with running(bundle, budget_usd=1e-9) as c:
        first = c.chat("sue me invoice")
        second = c.chat("sue me invoice")
        m = c.metrics()
        health = json.loads(c.request("GET", "/health")[2])
    assert first[1]["x-distill-route"] == "teacher"
    assert second[1]["x-distill-route"] == "student-fallback"
    assert second[2]["distill"]["reason"].startswith("trigger: legal threat; teacher "
                                                     "unavailable: teacher budget spent: $")
    assert second[2]["choices"][0]["message"]["content"] == "billing"  # the student's label
    assert m["distill_teacher_budget_refusals_total"] == 1
    assert m["distill_teacher_spend_usd"] > 0 and m["distill_teacher_budget_usd"] == 1e-9
    assert health["teacher_budget_usd"] == 1e-9
