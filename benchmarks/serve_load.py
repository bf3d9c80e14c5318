"""Load on `distill serve`: throughput and latency of POST /v1/chat/completions at several
client concurrencies, with real support messages.

    python benchmarks/serve_load.py [BUNDLE] [--requests 400] [--levels 1,8,32] [--threads N]

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


def start_server(bundle: Path, threads: int | None, stderr_path: Path) -> tuple[subprocess.Popen, str]:
    policy = json.loads((bundle / "policy.json").read_text())
    key_env = (policy.get("teacher") or {}).get("api_key_env")
    env = {k: v for k, v in os.environ.items() if k != key_env}
    cmd = [sys.executable, "-c", "from distill_compiler.cli import main; main()", "serve",
           str(bundle), "--port", "0", "--concurrency", "256"]
    if threads:
        cmd += ["--threads", str(threads)]
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, env=env)
    deadline = time.monotonic() + 60
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="JSONL rows {input: {message}} to send")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per level")
    parser.add_argument("--levels", default="1,8,32", help="client concurrencies")
    parser.add_argument("--threads", type=int, help="the server's parallel requests (--threads)")
    args = parser.parse_args()

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
