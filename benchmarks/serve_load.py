"""Load on `distill serve`: throughput and latency of POST /v1/chat/completions at several
client concurrencies, with real support messages.

    python benchmarks/serve_load.py [BUNDLE] [--requests 400] [--levels 1,8,32] [--threads N]
    python benchmarks/serve_load.py AGENT_BUNDLE --data LOG [--agent-requests 4,16,32]
        [--max-tokens 24] [--batch-rows 4]

A classify bundle gets plain requests. An agent (or extract) bundle gets streamed requests
(`stream: true`), timed to the first content or tool-call chunk (time to first token) and to
the end, and runs twice in the same process: the server decoding each request on its own
(`--batch-rows 1`, --threads at a time: the path before batching) and decoding up to
`--batch-rows` requests together. Agent requests are the opening user turns of the log's
conversations, with all of the bundle's tools offered and `max_tokens` set, so a 135M student
on two cores finishes a run in minutes.

The server is the real CLI (`distill serve`) in its own process; this process is the client
(httpx, keep-alive connections, one per concurrent slot), so on a small machine the two
share the CPU and the figures include the client's cost. The server runs without the
teacher's key, so requests the policy escalates fall back to the student (route
`student-fallback`): the figures are the server and the student, never a remote teacher.
Every response must be a 200; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "examples/harbor-support/build/harbor-support/bundle"
DEFAULT_DATA = ROOT / "examples/harbor-support/data/teacher_log.jsonl"
WARMUP = 32


def messages(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["input"]["message"] for row in rows]


def start_server(bundle: Path, threads: int | None, stderr_path: Path,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    policy = json.loads((bundle / "policy.json").read_text())
    key_env = (policy.get("teacher") or {}).get("api_key_env")
    env = {k: v for k, v in os.environ.items() if k != key_env}
    cmd = [sys.executable, "-c", "from distill_compiler.cli import main; main()", "serve",
           str(bundle), "--port", "0", "--concurrency", "256"]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += list(extra)
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, env=env)
    deadline = time.monotonic() + 1800  # a 540 MB decoder takes minutes to load on a busy CPU
    while not (m := re.search(r"on (http://\S+) ", stderr_path.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the server did not start:\n{stderr_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, m.group(1)


async def level(base: str, texts: list[str], concurrency: int, n: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        latencies: list[float] = []
        routes: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        next_index = 0

        async def worker(count: int, record: bool) -> None:
            nonlocal next_index
            while next_index < count:
                text = texts[next_index % len(texts)]
                next_index += 1
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json={
                    "model": "bundle", "messages": [{"role": "user", "content": text}]})
                if record:
                    latencies.append(time.perf_counter() - started)
                    statuses[response.status_code] += 1
                    routes[response.headers.get("x-distill-route", "none")] += 1

        await asyncio.gather(*(worker(WARMUP, False) for _ in range(concurrency)))
        next_index = 0
        started = time.perf_counter()
        await asyncio.gather(*(worker(n, True) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": n, "errors": n - statuses[200],
            "req_per_s": n / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "routes": dict(routes)}


def agent_turns(path: Path) -> list[list[dict]]:
    """The opening user turn of each conversation in a chat-format teacher log."""
    out, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        users = [m for m in json.loads(line)["request"]["messages"] if m["role"] == "user"]
        if users and users[0]["content"] not in seen:
            seen.add(users[0]["content"])
            out.append([{"role": "user", "content": users[0]["content"]}])
    return out


async def streamed(client: httpx.AsyncClient, body: dict) -> tuple[int, float, float, str]:
    """(status, seconds to the first content or tool-call delta, seconds to the end, route)."""
    started = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                delta = choices[0].get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    first = time.perf_counter() - started
        route = response.headers.get("x-distill-route", "none")
        status = response.status_code
    total = time.perf_counter() - started
    return status, total if first is None else first, total, route


async def agent_level(base: str, turns: list[list[dict]], concurrency: int, n: int,
                      max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=1800) as client:
        results: list[tuple[int, float, float, str]] = []
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < n:
                messages = turns[next_index % len(turns)]
                next_index += 1
                results.append(await streamed(client, {
                    "model": "bundle", "messages": messages, "stream": True,
                    "max_tokens": max_tokens}))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = np.array([r[1] for r in results]) * 1000
    ms = np.array([r[2] for r in results]) * 1000
    return {"concurrency": concurrency, "requests": n,
            "errors": sum(r[0] != 200 for r in results), "req_per_s": n / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "routes": dict(Counter(r[3] for r in results))}


def agent_run(args, tmp: Path) -> list[tuple[str, dict]]:
    """Both decoding paths over the same requests; the server restarts between them."""
    turns = agent_turns(args.data)
    levels = [int(c) for c in args.levels.split(",")]
    counts = [int(n) for n in args.agent_requests.split(",")]
    out = []
    paths = [("one request at a time", 1), (f"batched, {args.batch_rows} rows", args.batch_rows)]
    for label, rows in paths if args.decoding == "both" else paths[args.decoding == "batched":][:1]:
        proc, base = start_server(args.bundle, args.threads, tmp / f"stderr-{rows}.txt",
                                  ("--batch-rows", str(rows), "--request-timeout", "1800"))
        try:
            asyncio.run(agent_level(base, turns, 1, 2, args.max_tokens))  # warm-up
            for c, n in zip(levels, counts):
                result = asyncio.run(agent_level(base, turns, c, n, args.max_tokens))
                print(f"{label}: {json.dumps(result)}", flush=True)
                out.append((label, result))
        finally:
            proc.terminate()
            proc.wait(30)
    return out


def print_agent(bundle: Path, results: list[tuple[str, dict]], args) -> None:
    print(f"bundle {bundle} (agent, streamed, max_tokens {args.max_tokens}, {os.cpu_count()} "
          "cores, server and client on the same machine)")
    print(f"{'decoding':>22} {'conc':>4} {'reqs':>4} {'errors':>6} {'req/s':>6} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'ttft p50':>8} {'ttft p99':>8}  routes")
    for label, r in results:
        print(f"{label:>22} {r['concurrency']:>4} {r['requests']:>4} {r['errors']:>6} "
              f"{r['req_per_s']:>6.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} "
              f"{r['ttft_p50_ms']:>8.0f} {r['ttft_p99_ms']:>8.0f}  {json.dumps(r['routes'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="JSONL rows {input: {message}} to send")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per level")
    parser.add_argument("--levels", default="1,8,32", help="client concurrencies")
    parser.add_argument("--threads", type=int, help="the server's parallel requests (--threads)")
    parser.add_argument("--agent-requests", default="4,16,32",
                        help="agent bundles: timed requests at each concurrency level")
    parser.add_argument("--max-tokens", type=int, default=24, help="agent bundles: max_tokens")
    parser.add_argument("--batch-rows", type=int, default=4,
                        help="agent bundles: the batched server's --batch-rows")
    parser.add_argument("--decoding", choices=["both", "single", "batched"], default="both",
                        help="agent bundles: which decoding paths to run")
    args = parser.parse_args()

    task = json.loads((args.bundle / "policy.json").read_text()).get("task")
    if task in ("agent", "extract"):
        if task == "extract":
            sys.exit("the load run for decoder bundles sends agent turns; give an agent bundle")
        with tempfile.TemporaryDirectory() as tmp:
            results = agent_run(args, Path(tmp))
        print_agent(args.bundle, results, args)
        if any(r["errors"] for _, r in results):
            sys.exit(1)
        return

    texts = messages(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_server(args.bundle, args.threads, Path(tmp) / "stderr.txt")
        try:
            results = [asyncio.run(level(base, texts, int(c), args.requests))
                       for c in args.levels.split(",")]
        finally:
            proc.terminate()
            proc.wait(15)

    print(f"bundle {args.bundle} ({len(texts)} distinct messages, {os.cpu_count()} cores, "
          f"server and client on the same machine)")
    print(f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8}  routes")
    for r in results:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['errors']:>6} {r['req_per_s']:>8.1f} "
              f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}  {json.dumps(r['routes'])}")
    if any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
