"""Teacher fan-out: requests per second through the real client (litellm, cache, retries,
budget bookkeeping) against the fake OpenAI-compatible server with a fixed latency.

The server runs in its own process, so what is measured is the client's own cost.

    python benchmarks/teacher_fanout.py [--latency-ms 50] [--requests 256]

For each concurrency the ideal rate is concurrency / latency; the overhead per request is
what the orchestration adds on top: (wall - requests * latency / concurrency) / requests *
concurrency, i.e. the extra time each request slot spends outside the simulated latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from teacher_server import serve_forever  # noqa: E402

from distill_compiler.spec.models import Teacher as TeacherConfig  # noqa: E402
from distill_compiler.teacher.cache import RequestCache  # noqa: E402
from distill_compiler.teacher.client import Request, Teacher  # noqa: E402

LABELS = "Labels:\n- billing: money taken\n- refund: money back\n- out_of_scope: anything else"


def requests(n: int, tag: str) -> list[Request]:
    return [Request([{"role": "system", "content": LABELS},
                     {"role": "user", "content": f"{tag} message {i}: refund my order"}],
                    max_tokens=8, logprobs=True) for i in range(n)]


async def fan_out(teacher: Teacher, batch: list[Request]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(teacher.complete(r) for r in batch))
    return time.perf_counter() - started


def server_stats(api_base: str, reset: bool = False) -> dict:
    url = api_base.rsplit("/v1", 1)[0] + "/stats" + ("/reset" if reset else "")
    with urllib.request.urlopen(url) as response:
        return json.load(response)


async def measure(api_base: str, latency: float, cache_dir: Path, concurrency: int, n: int) -> dict:
    config = TeacherConfig(model="openai/x", api_base=api_base, max_concurrency=concurrency)
    teacher = Teacher(config, RequestCache.at(cache_dir / f"c{concurrency}"))
    # Warm up: litellm's lazy imports and the connection pool, outside the timing.
    await fan_out(teacher, requests(min(n, 2 * concurrency), f"warm-{concurrency}"))
    server_stats(api_base, reset=True)
    cpu = time.process_time()
    wall = await fan_out(teacher, requests(n, f"run-{concurrency}"))
    cpu = time.process_time() - cpu
    stats = server_stats(api_base)
    assert stats["hits"] == n, (stats, n)
    ideal_wall = n * latency / concurrency
    return {"concurrency": concurrency, "requests": n, "wall_s": wall, "req_s": n / wall,
            "ideal_req_s": concurrency / latency,
            "overhead_ms": (wall - ideal_wall) / n * concurrency * 1000,
            "client_cpu_ms": cpu / n * 1000, "max_in_flight": stats["max_in_flight"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    ports = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve_forever, args=(latency, ports), daemon=True)
    server.start()
    rows = []
    try:
        api_base = ports.get(timeout=30)
        with tempfile.TemporaryDirectory() as tmp:
            for concurrency in args.concurrency:
                n = args.requests if concurrency > 1 else min(args.requests, 64)
                rows.append(asyncio.run(measure(api_base, latency, Path(tmp), concurrency, n)))
    finally:
        server.terminate()
    print(f"fake teacher latency {args.latency_ms:.0f} ms; litellm acompletion, sqlite cache, logprobs on")
    print(f"{'concurrency':>11} {'requests':>8} {'wall s':>8} {'req/s':>8} {'ideal req/s':>11} "
          f"{'overhead ms/req':>15} {'client CPU ms/req':>17} {'max in flight':>13}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['requests']:>8} {r['wall_s']:>8.2f} {r['req_s']:>8.1f} "
              f"{r['ideal_req_s']:>11.1f} {r['overhead_ms']:>15.1f} {r['client_cpu_ms']:>17.1f} "
              f"{r['max_in_flight']:>13}")


if __name__ == "__main__":
    main()
