"""Hostile requests sent to every front end: `distill run`, the Python API and `distill serve`.

Each request is either answered or refused with `invalid input at $.path: ...` (the server:
a 4xx with a JSON error body); none may crash, echo a long input back, or leave the server
unable to answer the next request. The classify bundle is test_runtime's bag-of-words model;
the agent bundle is the tiny exported decoder (`distill serve` answers classify bundles only,
so the agent cases go through `distill run` and the API). `-s` prints the counts quoted in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_runtime import policy, write_bundle
from test_server import running

from distill_compiler.cli import main
from distill_compiler.runtime import load_bundle
from distill_compiler.runtime.format import InputError, sha256_file
from distill_compiler.serve.server import Limits

TEN_MB = 10 * 1024 * 1024
DEEP = 10_000
TALLY: Counter[str] = Counter()


def deep_list(depth: int) -> list:
    """A list nested `depth` levels, built without recursion."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@dataclass(frozen=True)
class Case:
    name: str
    value: object          # what the Python API gets
    text: str | None = None  # the JSON a client sends, when json.dumps cannot write it
    refuse: str | None = None  # a regex the refusal must match; None: answered or refused

    def json_text(self) -> str:
        return self.text if self.text is not None else json.dumps(self.value)


DEEP_TEXT = '{"message": "hi", "extra": ' + "[" * DEEP + "]" * DEEP + "}"
CLASSIFY_CASES = [
    Case("lone surrogate", {"message": "\ud800 hi"}, refuse="lone surrogate U\\+D800"),
    Case("invalid UTF-8", {"message": "caf\udce9"}, refuse=r"byte 0xe9 (at offset \d+ )?is not UTF-8"),
    Case("NUL", {"message": "charged\x00 twice"}, refuse="NUL"),
    Case("control characters", {"message": "charged\x07 \x1b[31m twice\x7f"}),
    Case("empty", {"message": ""}, refuse="empty"),
    Case("whitespace only", {"message": " \n\t "}, refuse="empty"),
    Case("over the schema limit", {"message": "x" * 3000}, refuse="too long"),
    Case("deeply nested", {"message": "hi", "extra": deep_list(DEEP)}, DEEP_TEXT,
         refuse="nested more than"),
    Case("10,000 messages", {"messages": [{"role": "user", "content": "hi"}] * 10_000}),
    Case("10 MB tool result", {"messages": [{"role": "user", "content": "charged"},
                                            {"role": "tool", "content": "x" * TEN_MB}]}),
    Case("message a number", {"message": 5}, refuse="not of type 'string'"),
    Case("message null", {"message": None}),
    Case("message a list", {"message": ["charged"]}),
    Case("message an object", {"message": {"a": 1}}),
    Case("not an object", ["charged"]),
    Case("a bare string", "charged"),
    Case("key not a string", {1: "charged"}, '{"1": "charged"}'),
]

TOOL_CALL = {"type": "function", "function": {"name": "get_order",
                                              "arguments": '{"order_id": "HB-10001"}'}}
USER = {"role": "user", "content": "where is order HB-10001"}
AGENT_CASES = [
    Case("lone surrogate", {"messages": [{"role": "user", "content": "\udfff"}]},
         refuse="lone surrogate"),
    Case("NUL", {"messages": [{"role": "user", "content": "a\x00"}]}, refuse="NUL"),
    Case("empty user turn", {"messages": [{"role": "user", "content": "  "}]}, refuse="empty"),
    Case("no user turn", {"messages": [{"role": "system", "content": "hi"}]},
         refuse="no user message"),
    Case("10,000 messages", {"messages": [USER] * 10_000}, refuse="the prompt is"),
    Case("10 MB tool result", {"messages": [USER, {"role": "assistant", "tool_calls": [TOOL_CALL]},
                                            {"role": "tool", "content": "x" * TEN_MB}]},
         refuse="the prompt is"),
    Case("deeply nested", {"messages": [USER], "x": deep_list(DEEP)},
         '{"messages": [{"role": "user", "content": "hi"}], "x": ' + "[" * DEEP + "]" * DEEP + "}",
         refuse="nested more than"),
    Case("deeply nested arguments", {"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_order", "arguments": "[" * DEEP + "]" * DEEP}}]}]},
         refuse="nested more than"),
    Case("arguments not JSON", {"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_order", "arguments": "{order"}}]}]}, refuse="not valid JSON"),
    Case("messages missing", {}, refuse="required"),
    Case("messages a string", {"messages": "hi"}, refuse=r"\$\.messages"),
    Case("messages empty", {"messages": []}, refuse=r"\$\.messages"),
    Case("message a number", {"messages": [1]}, refuse=r"\$\.messages\[0\]"),
    Case("role a number", {"messages": [{"role": 5, "content": "hi"}]}, refuse=r"\.role"),
    Case("role unknown", {"messages": [{"role": "robot", "content": "hi"}]}, refuse=r"\.role"),
    Case("content a number", {"messages": [{"role": "user", "content": 5}]}, refuse=r"\.content"),
    Case("tool_calls a string", {"messages": [USER, {"role": "assistant", "tool_calls": "x"}]},
         refuse=r"\.tool_calls"),
    Case("tool call a number", {"messages": [USER, {"role": "assistant", "tool_calls": [5]}]},
         refuse=r"\.tool_calls\[0\]"),
    Case("function a string", {"messages": [USER, {"role": "assistant",
                                                    "tool_calls": [{"function": "f"}]}]},
         refuse=r"\.function"),
    Case("function name a number", {"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": 5}}]}]}, refuse=r"\.name"),
    Case("arguments a number", {"messages": [USER, {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_order", "arguments": 5}}]}]}, refuse=r"\.arguments"),
    Case("tools a string", {"messages": [USER], "tools": "get_order"}, refuse=r"\$\.tools"),
    Case("tool name a number", {"messages": [USER], "tools": [5]}, refuse=r"\$\.tools\[0\]"),
    Case("unknown tool", {"messages": [USER], "tools": ["rm_rf"]}, refuse="unknown tools"),
    Case("not an object", [USER], refuse=r"at \$"),
]


# --------------------------------------------------------------------------- front ends

# The server's own refusals of a chat request's shape, before there is a bundle input to check.
SHAPE_CODES = {"invalid_body", "invalid_content", "missing_messages", "body_too_large"}


def judged(case: Case, front: str, refused: str | None, shape: bool = False) -> None:
    """A refusal must name the path, match the case and quote little of the input; `shape`:
    the server refused the chat request itself, in its own words."""
    TALLY[f"{front} tried"] += 1
    if refused is None:
        assert case.refuse is None, f"{front}: {case.name} was answered, expected a refusal"
        TALLY[f"{front} answered"] += 1
        return
    assert len(refused) < 600, f"{front}: {case.name}: the error echoes the input"
    assert "Traceback" not in refused
    if case.refuse is not None and not shape:
        assert "invalid input at " in refused, (front, case.name, refused)
        assert re.search(case.refuse, refused), (front, case.name, refused)
    TALLY[f"{front} refused"] += 1


def via_api(bundle, case: Case) -> None:
    try:
        answer = bundle.predict(case.value)
    except InputError as exc:
        return judged(case, "api", str(exc))
    assert answer["route"] in ("student", "teacher", "refusal"), answer
    judged(case, "api", None)


def via_cli(bundle_dir: Path, case: Case, capsys) -> None:
    text = case.json_text()
    if case.name == "invalid UTF-8":  # what Python makes of argv bytes that are not UTF-8
        text = text.replace("\\udce9", "\udce9")
    try:
        main(["run", str(bundle_dir), text])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    if code == 0:
        assert json.loads(captured.out)["route"], captured.out
        return judged(case, "cli", None)
    assert code == 2 and captured.err.startswith("error: "), (case.name, code, captured.err)
    judged(case, "cli", captured.err)


def via_server(client, case: Case) -> None:
    value = case.value
    if isinstance(value, dict) and "message" in value and "extra" not in value:
        body = json.dumps({"messages": [{"role": "user", "content": value["message"]}]})
    elif isinstance(value, dict) and "messages" in value:
        body = json.dumps(value)
    else:
        body = case.json_text() if isinstance(value, dict) else json.dumps(value)
    data = body.encode("utf-8", "surrogatepass")
    if case.name == "invalid UTF-8":
        data = data.replace(b"\\udce9", b"\xe9")  # raw bytes on the wire
    status, headers, raw = client.request("POST", "/v1/chat/completions", data,
                                          {"Content-Type": "application/json"})
    assert status < 500, (case.name, status, raw[:200])
    payload = json.loads(raw)  # every answer, refusals included, is JSON
    if status == 200:
        return judged(case, "server", None)
    assert status in (400, 413, 422), (case.name, status)
    judged(case, "server", payload["error"]["message"], payload["error"]["code"] in SHAPE_CODES)


# --------------------------------------------------------------------------- bundles

@pytest.fixture(scope="module")
def classify_dir(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("hostile-classify"), policy())


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory, exported_causal) -> Path:
    """A bundle of the tiny exported decoder with the agent policy evaluate would write."""
    from tiny_causal import causal_spec

    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.students.causal.evaluate import policy_dict

    root = tmp_path_factory.mktemp("hostile-agent")
    for name in ("model.onnx", "tokenizer.json", "decoder.json", "chat.json"):
        shutil.copy(exported_causal / name, root / name)
    spec = causal_spec("agent", export={"max_new_tokens": 48})
    (root / "policy.json").write_text(json.dumps(policy_dict(spec, ChatFormat(), 0.0)))
    files = {p.name: sha256_file(p) for p in root.iterdir()}
    (root / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    return root


# --------------------------------------------------------------------------- tests

def test_every_hostile_request_to_a_classify_bundle_is_answered_or_refused(classify_dir, capsys):
    bundle = load_bundle(classify_dir, threads=1)
    for case in CLASSIFY_CASES:
        via_api(bundle, case)
        if not isinstance(case.value, dict) or len(case.json_text()) < 1_000_000:
            via_cli(classify_dir, case, capsys)  # argv is capped well below 10 MB
    with running(classify_dir, env={}, limits=Limits(max_body_bytes=16 << 20)) as client:
        for case in CLASSIFY_CASES:
            via_server(client, case)
        status, _, health = client.request("GET", "/health")
        assert status == 200 and json.loads(health)["in_flight"] == 0
        status, _, answer = client.chat("charged twice")
        assert status == 200 and answer["distill"]["label"] == "billing"


def test_every_hostile_request_to_an_agent_bundle_is_answered_or_refused(agent_dir, capsys):
    bundle = load_bundle(agent_dir, threads=1)
    assert bundle.predict({"messages": [USER]})["output"]["role"] == "assistant"
    for case in AGENT_CASES:
        via_api(bundle, case)
        if len(case.json_text()) < 1_000_000:
            via_cli(agent_dir, case, capsys)
    with capsys.disabled():
        print(f"\nhostile inputs: {len(CLASSIFY_CASES)} classify and {len(AGENT_CASES)} agent "
              f"classes; {dict(sorted(TALLY.items()))}; 0 crashes")


def test_argv_bytes_that_are_not_utf8_are_an_input_error(classify_dir):
    """The one case a real process shows best: bytes in argv, decoded by Python itself."""
    run = subprocess.run([sys.executable, "-c", "from distill_compiler.cli import main; main()",
                          "run", str(classify_dir).encode(), b'{"message": "caf\xe9"}'],
                         capture_output=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert b"invalid input at $.message: byte 0xe9 is not UTF-8" in run.stderr
    assert b"Traceback" not in run.stderr
