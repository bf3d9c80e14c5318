"""Schema-constrained decoding speed: the hand-written engine against llguidance, same bundles.

    python benchmarks/constrained_speed.py [--baseline f962101] [--bundle DIR] [--tokens 48]

Two bundles: the tests' scratch fixture (a ~100k-parameter Llama on a 400-token byte-level
BPE, trained and exported here, then cached in the work directory) and a SmolLM2-135M agent
bundle (49,152 tokens; by default the support-agent example's build, read in place). Each is
decoded greedily over the same prompts by two runtimes: the one in this checkout (llguidance)
and the runtime/ package as it was at `--baseline`, read from git into a temporary package (so
the old engine can be measured after it left the tree).

Per runtime and bundle: mask time per token p50/p99 (the guide's mask() call, the only
constrained work on most steps), guide time per token p50/p99 (forced() + mask() + advance():
everything constrained decoding adds to a step), decode tokens/s of constrained answers (new
tokens over the whole answer, prefill included, as Completion.tokens_per_second), the setup of
the first request (vocabulary and grammar built) and the share of answers valid for their
schema. Prints and writes <workdir>/results.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import ROOT, WORK, command, write_results

sys.path.insert(0, str(ROOT / "tests"))  # the scratch fixture's builders

SUPPORT_AGENT = ROOT / "examples" / "support-agent" / "build" / "support-agent" / "bundle"
USERS = ("where is my order HB-20417?", "please cancel HB-55102, I changed my mind",
         "my parcel HB-31877 arrived damaged, I want to return it",
         "change the address of HB-62004 to 4 Quay Street, Leith, EH6 6LX",
         "hi, what can you do?", "cancel my order", "HB-11111 never came", "thanks, bye")


def baseline_runtime(rev: str, into: Path):
    """distill_compiler/runtime/ at `rev` as the package `baseline_runtime` (a leaf: relative
    imports only), imported from `into`."""
    package = into / "baseline_runtime"
    package.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:distill_compiler/runtime"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for name in (n for n in names if n.endswith(".py")):
        text = subprocess.run(["git", "show", f"{rev}:distill_compiler/runtime/{name}"],
                              cwd=ROOT, check=True, capture_output=True, text=True).stdout
        (package / name).write_text(text)
    sys.path.insert(0, str(into))
    return importlib.import_module("baseline_runtime.decoder")


def scratch_bundle(workdir: Path) -> Path:
    """The tests' exported tiny causal student (conftest's exported_causal), built once."""
    out = workdir / "scratch" / "export"
    if (out / "decoder.json").exists():
        return out
    from tiny_causal import causal_spec, train_tiny_causal, write_causal_splits

    from distill_compiler.artifacts import Artifact
    from distill_compiler.pipeline import SpecView, StageContext
    from distill_compiler.stages import curate, export, train

    root = workdir / "scratch"
    splits = write_causal_splits(root / "splits", "agent", range(48), range(48, 60), range(60, 66))
    trained = train_tiny_causal(root / "train", range(48))
    spec = causal_spec("agent", export={"quantize": "int8", "min_parity": 0.8,
                                        "max_new_tokens": 48})
    inputs = {"train": Artifact(trained, train.KIND, "fixture-train", {}),
              "curate": Artifact(splits, curate.KIND, "fixture-curate", {})}
    out.mkdir(parents=True)
    export.run(StageContext("export", SpecView(spec, export.KEYED_ON), root, inputs, out,
                            root / ".distill"))
    return out


def workload(bundle: Path, runtime) -> tuple[str, list[tuple[str, object]]]:
    """The agent system turn (warmed: both engines skip its prefill), and (prompt, mode) pairs:
    the bundle's own agent prompts (its policy's tools and description) for every user turn,
    with tool_choice auto and required; for the scratch bundle also the fixture extraction
    schema (which both engines can enforce)."""
    policy = json.loads((bundle / "policy.json").read_text()) if (bundle / "policy.json").exists() \
        else None
    chat = runtime.ChatFormat.from_dict(json.loads((bundle / "chat.json").read_text()))
    if policy is None:  # the scratch export artifact: the fixture spec's tools
        from tiny_causal import EXTRACT_SCHEMA, TOOLS
        tools, description, extract = list(TOOLS), "Fixture shop assistant.", EXTRACT_SCHEMA
    else:
        tools, description, extract = policy["tools"], policy.get("description", ""), None
    system = chat.system_text(description, tools)
    out = []
    for user in USERS:
        messages = chat.prepare([{"role": "user", "content": user}], system, tools)
        prompt = chat.render(messages, add_generation_prompt=True)
        out += [(prompt, runtime.Agent(tools, "auto")), (prompt, runtime.Agent(tools, "required"))]
        if extract is not None:
            turn = chat.prepare([{"role": "user", "content": user}], "Extract the order issue.")
            out.append((chat.render(turn, add_generation_prompt=True), runtime.Extract(extract)))
    return chat.render(chat.prepare([], system, tools)), out


class Timed:
    """A guide whose calls are timed: mask() alone, and everything it does per token."""

    def __init__(self, guide, masks: list, steps: list):
        self.guide, self.masks, self.steps, self.spent = guide, masks, steps, 0.0

    def _timed(self, name, *args):
        started = time.perf_counter()
        result = getattr(self.guide, name)(*args)
        spent = time.perf_counter() - started
        self.spent += spent
        if name == "mask" and result is not None:
            self.masks.append(spent)
        if name == "advance":
            self.steps.append(self.spent)
            self.spent = 0.0
        return result

    def mask(self):
        return self._timed("mask")

    def forced(self):
        return self._timed("forced")

    def advance(self, token):
        return self._timed("advance", token)

    def reject(self, token):
        return self._timed("reject", token)


def measure(runtime, bundle: Path, tokens: int, threads: int) -> dict:
    import jsonschema

    started = time.perf_counter()
    decoder = runtime.Decoder(bundle, threads=threads)
    prefix, items = workload(bundle, runtime)
    decoder.warm(prefix)
    _, first_mode = items[0]
    setup_started = time.perf_counter()
    decoder.guide(first_mode).mask()  # the vocabulary and the first grammar, built once
    setup = time.perf_counter() - setup_started
    masks, steps, rates, valid, calls = [], [], [], 0, 0
    guide_of = decoder.guide
    decoder.guide = lambda mode: Timed(guide_of(mode), masks, steps)
    for prompt, mode in items:
        c = decoder.complete(prompt, mode, tokens)
        rates.append(c.tokens_per_second)
        if isinstance(mode, runtime.Extract):
            calls += 1
            try:
                jsonschema.validate(json.loads(c.message["content"]), mode.schema)
                valid += 1
            except (ValueError, TypeError, jsonschema.ValidationError):
                pass
        for call in c.message.get("tool_calls") or ():
            calls += 1
            schema = next(t["parameters"] for t in mode.tools
                          if t["name"] == call["function"]["name"])
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
                valid += 1
            except jsonschema.ValidationError:
                pass

    def quantiles(values):
        ordered = sorted(values)
        return {"p50": round(1e3 * ordered[len(ordered) // 2], 4),
                "p99": round(1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4)}

    return {"vocab_size": decoder.spec.vocab_size, "answers": len(items), "tokens": len(steps),
            "mask_ms": quantiles(masks), "guide_ms_per_token": quantiles(steps),
            "decode_tokens_per_second": round(statistics.median(rates), 1),
            "first_request_setup_s": round(setup, 3), "valid_outputs": f"{valid}/{calls}",
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="f962101",
                        help="git revision whose runtime/ has the hand-written engine")
    parser.add_argument("--bundle", type=Path, default=SUPPORT_AGENT,
                        help="a SmolLM2 decoder bundle (49k vocabulary)")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens per answer")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    parser.add_argument("--workdir", type=Path, default=WORK / "constrained_speed")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from distill_compiler.runtime import decoder as current

    bundles = {"scratch": scratch_bundle(args.workdir), "smollm2": args.bundle}
    results = {"command": command("constrained_speed.py", argv), "baseline": args.baseline,
               "bundles": {k: str(v) for k, v in bundles.items()}, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_runtime(args.baseline, Path(tmp))
        for name, bundle in bundles.items():
            for engine, runtime in (("hand-written", old), ("llguidance", current)):
                results["runs"][f"{name}/{engine}"] = run = measure(runtime, bundle, args.tokens,
                                                                    args.threads)
                print(name, engine, json.dumps(run), file=sys.stderr, flush=True)
    write_results(args.workdir, results)


if __name__ == "__main__":
    main()
