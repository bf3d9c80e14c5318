"""A fake OpenAI-compatible teacher on a real socket, for tests and benchmarks.

A stdlib ThreadingHTTPServer on 127.0.0.1 (random port, in a thread) that answers
`POST /v1/chat/completions` deterministically from the request, like a small rule-based
teacher that understands the built-in prompt templates:

- generation requests (`response_format` named `generated_inputs`) get `n` distinct sentences,
  each carrying the keyword of the first label named in the prompt;
- labelling requests (a system prompt listing `- label: description` lines) get the first
  label whose keyword occurs in the message (else `out_of_scope`), with token logprobs when
  asked;
- other structured requests get the smallest instance of their JSON Schema built from words
  of the message; requests with `tools` call the first tool once, then answer in text.

Faults are injected per request, in order (`inject("ok", "429", "500", ...)`; "ok" passes one
request through untouched), or for every request
(`broken = True`): 429 with Retry-After, 500, a timeout (sleeps past the client's timeout),
malformed JSON and schema-invalid answers. `hits` counts every HTTP request received (`authorizations` holds their
Authorization headers), `max_in_flight` the most served at once (also
served at `GET /stats`, and `GET /stats/reset` zeroes them, for a client in another process).

Batch endpoints (OpenAI-style, what litellm's create_file / create_batch / retrieve_batch /
file_content call): `POST /v1/files` (multipart JSONL upload), `POST /v1/batches`,
`GET /v1/batches/{id}` and `GET /v1/files/{id}/content`, in `BatchDesk` (`server.batch`). A
batch is answered line by line as the chat endpoint would answer it, after `polls` retrieves
that report it in progress, or never while `hold` is set (a crash drill kills the client
then). Line faults are injected in order (`batch.inject("ok", "500", "429", "drop", ...)`:
an error line in the error file, or a line missing from both files), and
`batch.fail_next = "failed" | "expired"` ends the next batch without output. It counts what
it is paid: `created` batches, `paid` answered lines, `paid_prompts` per request body.

For crash drills, `hold_after = n` answers the first n requests and holds every later one
unanswered (counted in `held`) until `release_held()`, which drops them without an answer;
`answered` counts the answers sent, and `answered_prompts` how often each request body was
answered.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo",
         "juniper", "kelp", "lagoon", "maple", "nectar", "onyx", "pepper", "quartz",
         "raven", "saffron", "tundra", "umber", "velvet", "willow", "xenon", "yarrow",
         "zephyr", "anchor", "beacon", "canyon", "dune", "estuary", "falcon", "glacier",
         "heron", "island", "jetty", "knoll", "lantern", "meadow", "nebula", "orchard",
         "prairie", "quarry", "ridge", "summit", "thicket", "upland", "valley", "wharf")
FAULTS = ("ok", "429", "500", "timeout", "malformed", "invalid")


class FakeTeacher:
    def __init__(self, keywords: dict[str, list[str]] | None = None, *, latency: float = 0.0,
                 retry_after: str = "0.05", timeout_sleep: float = 1.0, port: int = 0):
        self.keywords = {k: [w.lower() for w in v] for k, v in (keywords or {}).items()}
        self.latency, self.retry_after, self.timeout_sleep = latency, retry_after, timeout_sleep
        self.broken = False
        self.hits = 0
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self._faults: deque[str] = deque()
        self.hold_after: int | None = None
        self.admitted = self.answered = self.held = 0
        self.answered_prompts: Counter[str] = Counter()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.batch = BatchDesk(self)
        # port 0: any free one. A fixed port keeps `api_base`, part of every cache key, the same
        # from one benchmark run to the next.
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeTeacher:  # noqa: PYI034 (Self needs Python 3.11)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, *faults: str) -> None:
        assert all(f in FAULTS for f in faults), faults
        with self._lock:
            self._faults.extend(faults)

    def reset_counts(self) -> None:
        with self._lock:
            self.hits, self.bodies, self.max_in_flight = 0, [], 0

    def release_held(self) -> None:
        """Stop holding: the held requests end unanswered, later ones are answered."""
        with self._lock:
            self.hold_after = None
        self._released.set()

    def _admit(self) -> bool:
        """False when this request is to be held (see hold_after)."""
        with self._lock:
            if self.hold_after is not None and self.admitted >= self.hold_after:
                self.held += 1
                return False
            self.admitted += 1
            return True

    def _answered(self, body: dict) -> None:
        with self._lock:
            self.answered += 1
            self.answered_prompts[_digest(body)] += 1

    def _take(self, body: dict) -> str | None:
        with self._lock:
            self.hits += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(body)
            if self.broken:
                return "500"
            fault = self._faults.popleft() if self._faults else None
            return None if fault == "ok" else fault

    # ----------------------------------------------------------------- answers

    def answer(self, body: dict, fault: str | None) -> dict:
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") or ""
        fmt = (body.get("response_format") or {}).get("json_schema") or {}
        logprobs = None
        tool_calls = None
        if body.get("tools"):
            content, tool_calls = self._agent(body["tools"], messages)
        elif fmt.get("name") == "generated_inputs":
            content = json.dumps({"items": self._sentences(messages, fmt["schema"])})
        elif fmt:
            content = json.dumps(instance(fmt["schema"], user))
        elif labels := re.findall(r"^- ([a-z][a-z0-9_]*):", system, re.MULTILINE):
            label = self.label(user, labels)
            content = label
            if body.get("logprobs"):
                logprobs = label_logprobs(label, labels, body.get("top_logprobs") or 0)
        else:
            content = " ".join(random.Random(_digest(messages)).sample(WORDS, 6))
        if fault == "malformed":
            content = "{not json at all"
        elif fault == "invalid":
            content = json.dumps({"unexpected": True}) if fmt else "definitely_not_a_label"
        message = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        return {"id": "chatcmpl-" + _digest(body)[:12], "object": "chat.completion",
                "created": 0, "model": body.get("model", "x"),
                "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                             "finish_reason": "tool_calls" if tool_calls else "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 8,
                          "total_tokens": prompt_tokens + 8}}

    def label(self, text: str, labels: list[str]) -> str:
        lowered = text.lower()
        for label in labels:
            if any(k in lowered for k in self.keywords.get(label, ())):
                return label
        return "out_of_scope" if "out_of_scope" in labels else labels[0]

    def _sentences(self, messages: list[dict], schema: dict) -> list[str]:
        n = schema["properties"]["items"].get("maxItems", 5)
        prompt = "\n".join(str(m.get("content")) for m in messages)
        named = sorted((prompt.find(label), label) for label in self.keywords if label in prompt)
        keyword = self.keywords[named[0][1]][0] if named else None
        out = []
        for i in range(n):
            rng = random.Random(f"{_digest(messages)}:{i}")
            words = rng.sample(WORDS, 7)
            if keyword:
                words.insert(rng.randrange(len(words)), keyword)
            out.append(" ".join(words))
        return out

    def _agent(self, tools: list[dict], messages: list[dict]):
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        if any(m["role"] == "tool" for m in messages[last_user:]):
            return "Done: " + " ".join(random.Random(_digest(messages)).sample(WORDS, 5)), None
        fn = tools[0]["function"]
        args = instance(fn.get("parameters") or {"type": "object"}, messages[last_user]["content"])
        call = {"id": "call_" + _digest(messages)[:8], "type": "function",
                "function": {"name": fn["name"], "arguments": json.dumps(args)}}
        return None, [call]

BATCH_FAULTS = ("ok", "500", "429", "400", "drop")


class BatchDesk:
    """The batch API of a FakeTeacher: uploaded files, batches and what they were paid."""

    def __init__(self, teacher: FakeTeacher):
        self.teacher = teacher
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.polls = 1  # retrieves that answer "in_progress" before a batch completes
        self.hold = False
        self.fail_next: str | None = None
        self.created = self.paid = self.retrieves = 0
        self.paid_prompts: Counter[str] = Counter()
        self._faults: deque[str] = deque()
        self._lock = threading.Lock()

    def inject(self, *faults: str) -> None:
        assert all(f in BATCH_FAULTS for f in faults), faults
        with self._lock:
            self._faults.extend(faults)

    def upload(self, content: bytes) -> dict:
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = content
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}

    def create(self, body: dict) -> dict:
        with self._lock:
            self.created += 1
            batch_id = f"batch_{self.created}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                "input_file_id": body["input_file_id"], "completion_window": "24h",
                "status": "in_progress", "output_file_id": None, "error_file_id": None,
                "created_at": 0, "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "metadata": body.get("metadata"), "_polls": 0}
            return self._public(batch_id)

    def retrieve(self, batch_id: str) -> dict | None:
        with self._lock:
            self.retrieves += 1
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            if batch["status"] == "in_progress" and not self.hold:
                batch["_polls"] += 1
                if batch["_polls"] > self.polls:
                    self._finish(batch)
            return self._public(batch_id)

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def _finish(self, batch: dict) -> None:
        """Answer every line of the batch's input file (under self._lock)."""
        if self.fail_next:
            batch["status"], self.fail_next = self.fail_next, None
            return
        lines = [json.loads(line) for line in self.files[batch["input_file_id"]].splitlines()
                 if line.strip()]
        out, errors = [], []
        for i, line in enumerate(lines):
            fault = self._faults.popleft() if self._faults else "ok"
            row = {"id": f"batch_req_{batch['id']}_{i}", "custom_id": line["custom_id"]}
            if fault == "drop":
                continue
            if fault != "ok":
                errors.append({**row, "response": {"status_code": int(fault), "body": {
                    "error": {"message": f"injected {fault}", "type": "server_error"}}},
                    "error": None})
                continue
            answer = self.teacher.answer(line["body"], None)
            out.append({**row, "response": {"status_code": 200, "request_id": row["id"],
                                            "body": answer}, "error": None})
            self.paid += 1
            self.paid_prompts[_digest(line["body"])] += 1
        batch["request_counts"] = {"total": len(lines), "completed": len(out),
                                   "failed": len(errors)}
        batch["status"] = "completed"
        for name, rows in (("output_file_id", out), ("error_file_id", errors)):
            if rows:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[name] = file_id


def multipart_file(content_type: str, data: bytes) -> bytes:
    """The `file` part of a multipart/form-data upload."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + data)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_payload(decode=True)
    raise ValueError("no file part in the upload")


def instance(schema: dict, text: str):
    """The smallest value valid for `schema`, filled from the words of `text`."""
    words = [w for w in re.findall(r"[A-Za-z]+", text or "") if len(w) > 3] or ["value"]
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties", {})
        return {k: instance(v, text) for k, v in props.items()}
    if kind == "array":
        return [instance(schema.get("items", {"type": "string"}), text)]
    if kind == "integer":
        return len(words)
    if kind == "number":
        return float(len(words))
    if kind == "boolean":
        return True
    return words[0]


def label_logprobs(label: str, labels: list[str], top: int) -> dict:
    """Logprobs of a label answer split at underscores: 0.8 on the chosen first token, 0.15
    shared by the other labels' first tokens, 0.05 on a token that names no label."""
    tokens = re.findall(r"_?[^_]+", label)
    others = sorted({re.findall(r"_?[^_]+", l)[0] for l in labels} - {tokens[0]})
    first = [(tokens[0], math.log(0.8))] + [(t, math.log(0.15 / max(1, len(others)))) for t in others]
    first.append(("Sorry", math.log(0.05)))
    content = []
    for i, token in enumerate(tokens):
        alts = first if i == 0 else [(token, math.log(0.99)), ("?", math.log(0.01))]
        content.append({"token": token, "logprob": alts[0][1], "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                         for t, lp in alts[:top]]})
    return {"content": content}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _handler(teacher: FakeTeacher):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            """`GET /stats`: the counters, for a client in another process (benchmarks);
            `GET /v1/batches/{id}` and `GET /v1/files/{id}/content`: the batch API."""
            path = self.path.split("?")[0]
            if m := re.fullmatch(r".*/batches/([^/]+)", path):
                batch = teacher.batch.retrieve(m.group(1))
                return self._send(200, batch) if batch else self._send(404, {"error": {
                    "message": "no such batch", "type": "invalid_request_error"}})
            if m := re.fullmatch(r".*/files/([^/]+)/content", path):
                return self._send_bytes(teacher.batch.files[m.group(1)])
            with teacher._lock:
                stats = {"hits": teacher.hits, "max_in_flight": teacher.max_in_flight}
                if self.path.endswith("/reset"):
                    teacher.hits, teacher.bodies, teacher.max_in_flight = 0, [], 0
            self._send(200, stats)

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.endswith("/files"):
                return self._send(200, teacher.batch.upload(
                    multipart_file(self.headers["Content-Type"], data)))
            if self.path.endswith("/batches"):
                return self._send(200, teacher.batch.create(json.loads(data)))
            body = json.loads(data)
            teacher.authorizations.append(self.headers.get("Authorization"))
            fault = teacher._take(body)
            try:
                self._answer(body, fault)
            finally:
                with teacher._lock:
                    teacher.in_flight -= 1

        def _answer(self, body: dict, fault: str | None) -> None:
            if not teacher._admit():
                teacher._released.wait()
                self.close_connection = True  # dropped: the client that sent it is gone
                return
            if teacher.latency:
                time.sleep(teacher.latency)
            if fault == "timeout":
                time.sleep(teacher.timeout_sleep)
            if fault == "429":
                return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                  {"Retry-After": teacher.retry_after})
            if fault == "500":
                return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
            if self._send(200, teacher.answer(body, fault)):
                teacher._answered(body)

        def _send_bytes(self, data: bytes) -> bool:
            return self._send(200, None, {"Content-Type": "application/octet-stream"}, data)

        def _send(self, status: int, payload: dict | None, headers: dict | None = None,
                  data: bytes | None = None) -> bool:
            data = json.dumps(payload).encode() if data is None else data
            headers = {"Content-Type": "application/json", **(headers or {})}
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                return True
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                return False

    return Handler


def serve_forever(latency: float, port_out) -> None:
    """Run a FakeTeacher until killed, reporting its api_base on `port_out` (a Queue): for
    benchmarks, so the server's CPU does not share the client's interpreter lock."""
    with FakeTeacher(latency=latency) as server:
        port_out.put(server.api_base)
        threading.Event().wait()
