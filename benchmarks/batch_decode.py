"""Batched against one-at-a-time decoding of an agent bundle's student, in one process: the
same prompts (opening user turns of a chat-format log), the runtime's constraint, the system
turn warmed once; checks that the tokens agree and prints both wall times.

    python benchmarks/batch_decode.py BUNDLE --data LOG [--prompts 4] [--tokens 20] [--rows 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from distill_compiler.runtime import load_bundle


def opening_turns(path: Path, n: int) -> list[str]:
    turns: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        users = [m for m in json.loads(line)["request"]["messages"] if m["role"] == "user"]
        if users and users[0]["content"] not in turns:
            turns.append(users[0]["content"])
        if len(turns) == n:
            break
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()

    started = time.perf_counter()
    bundle = load_bundle(args.bundle, threads=1)
    print(f"load {time.perf_counter() - started:.1f} s", flush=True)
    inputs = [{"messages": [{"role": "user", "content": t}]}
              for t in opening_turns(args.data, args.prompts)]
    prompts = [bundle.prompt_ids(x) for x in inputs]
    modes = [bundle.policy.mode(x) for x in inputs]
    started = time.perf_counter()
    alone = [bundle.decoder.generate(p, m, args.tokens) for p, m in zip(prompts, modes)]
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    together = bundle.decoder.generate_many(prompts, modes, args.tokens, rows=args.rows)
    together_s = time.perf_counter() - started
    tokens = sum(c.new_tokens for c in alone)
    print(f"one at a time: {alone_s:.1f} s ({tokens / alone_s:.2f} tokens/s); "
          f"{args.rows} rows together: {together_s:.1f} s ({tokens / together_s:.2f} tokens/s)")
    for a, b in zip(alone, together):
        print(f"same tokens {a.token_ids == b.token_ids}, confidence {a.confidence:.5f} / "
              f"{b.confidence:.5f}: {a.text[:60]!r}")


if __name__ == "__main__":
    main()
