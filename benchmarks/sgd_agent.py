"""Schema-Guided Dialogue as agent traces: compile an agent student on SGD's train dialogues,
then report its tool calls on dev, which the compiler never sees.

    python benchmarks/sgd_agent.py [--train-dialogues N] [--dev-points N] [--base ID]
                                   [--train-traces dialogues|calls] [--set student.epochs=2 ...]

Each train dialogue becomes one recorded teacher-log line (`--train-traces dialogues`, the
default): every turn before its last SYSTEM turn is the request (user turns as user messages,
system turns as assistant text, calls as assistant tool calls each followed by a tool message
holding that call's results), the last turn the response, and the request offers the tools of
the dialogue's services only. The compiler trains every assistant turn of a trace, so each
SYSTEM turn, call or reply, is a target. `--train-traces calls` makes one line per call point
instead, cut to the last `--context-turns` turns: the recipe of the first pretrained-base table,
which taught the student to call at almost every turn (benchmarks/RESULTS.md). Dev is scored
per SYSTEM turn: call points and turns that call nothing, each with the dialogue before it.
One tool per (service, intent) of schema.json, named `<service>__<intent>` because intents
repeat across services (FindRestaurants is in Restaurants_1 and Restaurants_2, with different
slots). The spec lists the tools of train and dev: dev has
services train never saw (Alarm_1, Banks_2, Flights_3, Hotels_4, Restaurants_2).

Prints (and writes to <workdir>/results.json): on dev, tool-name and method accuracy, full-call
exact match, argument F1 and schema validity with and without constrained decoding, the same
per call depth (service calls made earlier in the dialogue) and per tool, and tokens per second
of the fp32 and int8 ONNX decoders measured side by side in one run.

The defaults are sized for a 2-core CPU and the default base (`smollm2-135m`, ~130 tokens/s of
full fine-tuning there): a seeded sample of train dialogues and dev points and the first R
results of each earlier call. `--base scratch:4x256` is the
from-scratch student of earlier tables; `--set student.epochs=0` the untuned base (zero-shot).
On a GPU pass `--base gemma-3-270m` (or any causal LM), `--train-dialogues 0 --dev-points 0`
(everything) and `--max-results 0 --slot-descriptions` (whole prompts).
Data: ../shared/datasets/sgd (CC BY-SA 4.0, Google), read in place; the converted logs, which
carry the same licence, go to <workdir> (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from harness import (  # benchmarks/ is on sys.path as the script's folder
    DATASETS,
    WORK,
    command,
    compile_spec,
    decoder_parser,
    write_jsonl,
    write_results,
    write_spec,
)

DATA = DATASETS / "sgd"
SEPARATOR = "__"  # between service and intent in a tool name: neither contains two underscores
DESCRIPTION = ("A virtual assistant for banking, flights, hotels, restaurants, ride sharing, "
               "weather, alarms and payments. When the user's request needs a service, call its "
               "tool with the values the user agreed to; otherwise answer briefly.")


# --------------------------------------------------------------------------- schema -> tools

def tool_name(service: str, intent: str) -> str:
    return f"{service}{SEPARATOR}{intent}"


def method_of(name: str | None) -> str | None:
    return name.split(SEPARATOR, 1)[-1] if isinstance(name, str) else None


def tool_parameters(service: dict, intent: dict, slot_descriptions: bool = True) -> dict:
    """An intent's slots as an object schema constrained decoding can enforce: every value is a
    string (SGD's canonical values are), a categorical slot's values are an enum, required
    slots are required and optional ones may be left out."""
    slots = {s["name"]: s for s in service["slots"]}
    properties = {}
    for name in [*intent["required_slots"], *intent["optional_slots"]]:
        slot = slots[name]
        schema: dict = {"type": "string"}
        if slot["is_categorical"]:
            schema["enum"] = list(slot["possible_values"])
        if slot_descriptions:
            schema["description"] = slot["description"]
        properties[name] = schema
    return {"type": "object", "properties": properties,
            "required": list(intent["required_slots"]), "additionalProperties": False}


def service_tools(service: dict, slot_descriptions: bool = True) -> list[dict]:
    """One OpenAI function tool per intent of an SGD service schema."""
    return [{"type": "function", "function": {
        "name": tool_name(service["service_name"], intent["name"]),
        "description": intent["description"],
        "parameters": tool_parameters(service, intent, slot_descriptions)}}
        for intent in service["intents"]]


def read_schemas(paths: Sequence[Path]) -> dict[str, dict]:
    """Service schemas by name, from several schema.json files (a service both splits share is
    the same schema; the first file's copy is kept)."""
    services: dict[str, dict] = {}
    for path in paths:
        for service in json.loads(path.read_text(encoding="utf-8")):
            services.setdefault(service["service_name"], service)
    return services


# --------------------------------------------------------------------------- dialogues -> log

def call_message(call_id: str, name: str, parameters: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{
        "id": call_id, "type": "function",
        "function": {"name": name, "arguments": json.dumps(parameters, ensure_ascii=False)}}]}


def dialogue_lines(dialogue: dict, tools: dict[str, list[dict]], context_turns: int = 0,
                   max_results: int = 0, replies: bool = False) -> list[dict]:
    """A dialogue's service calls as teacher-log lines, in order; with `replies`, also each
    SYSTEM turn that calls nothing, its utterance as the response (the "no call" class).

    `tools` maps a service name to its OpenAI tools. `context_turns` keeps only the last K
    dialogue turns before each call (0: all), cut so that the context starts on a user turn;
    `max_results` keeps the first R entities of each earlier call's results (0: all). Each line
    carries `meta` (dialogue id, service, calls made before it in the dialogue), which log
    replay ignores and the evaluation reads; `meta.kind` is "call" or "reply".
    """
    offered = [t for service in dialogue["services"] for t in tools[service]]
    messages: list[dict] = []
    starts: list[int] = []  # index in `messages` where each dialogue turn begins
    lines: list[dict] = []
    depth = 0  # service calls made so far in the dialogue
    for index, turn in enumerate(dialogue["turns"]):
        starts.append(len(messages))
        if turn["speaker"] == "USER":
            messages.append({"role": "user", "content": turn["utterance"]})
            continue
        context_start = starts[_first_kept_turn(dialogue["turns"], index, context_turns)]
        calls = [frame for frame in turn["frames"] if frame.get("service_call")]
        if replies and not calls:
            service = turn["frames"][0]["service"] if turn["frames"] else dialogue["services"][0]
            lines.append(_line(dialogue, service, messages[context_start:],
                               offered, {"role": "assistant", "content": turn["utterance"]},
                               "reply", depth))
        for frame in calls:
            call = frame["service_call"]
            call_id = f"call_{depth}"
            name = tool_name(frame["service"], call["method"])
            lines.append(_line(dialogue, frame["service"], messages[context_start:], offered,
                               call_message(call_id, name, call["parameters"]), "call", depth))
            depth += 1
            results = frame.get("service_results") or []
            messages += [call_message(call_id, name, call["parameters"]),
                         {"role": "tool", "tool_call_id": call_id, "content": json.dumps(
                             results[:max_results] if max_results else results,
                             ensure_ascii=False)}]
        messages.append({"role": "assistant", "content": turn["utterance"]})
    return lines


def _line(dialogue: dict, service: str, context: list[dict], offered: list[dict],
          response: dict, kind: str, depth: int) -> dict:
    return {"request": {"messages": context, "tools": offered},
            "response": {"choices": [{"message": response}]},
            "meta": {"dialogue_id": dialogue["dialogue_id"], "service": service, "depth": depth,
                     "kind": kind}}


def calls_in(line: dict) -> int:
    """Service calls a log line trains: those in its context and its response."""
    messages = [*line["request"]["messages"], line["response"]["choices"][0]["message"]]
    return sum(len(m.get("tool_calls") or ()) for m in messages if m["role"] == "assistant")


def _first_kept_turn(turns: list[dict], index: int, context_turns: int) -> int:
    """The first turn of the last `context_turns` turns before `index`, moved on to a user turn
    so that a truncated context never opens with the assistant."""
    first = max(0, index - context_turns) if context_turns else 0
    while first < index and turns[first]["speaker"] != "USER":
        first += 1
    return first


def convert(dialogues: Sequence[dict], services: dict[str, dict], context_turns: int,
            max_results: int, slot_descriptions: bool = True, replies: bool = False) -> list[dict]:
    tools = {name: service_tools(s, slot_descriptions) for name, s in services.items()}
    return [line for d in dialogues
            for line in dialogue_lines(d, tools, context_turns, max_results, replies)]


def whole_dialogues(dialogues: Sequence[dict], services: dict[str, dict], max_results: int,
                    slot_descriptions: bool = True) -> list[dict]:
    """Each dialogue as one teacher-log line: every turn before its last SYSTEM turn is the
    request and that turn the response. The compiler trains every assistant turn of a trace, so
    one line trains all of a dialogue's calls and replies in one pass over its tokens, at every
    depth. Call points cut at the last K turns train only calls as the final turn, and a student
    learns from them that a turn after that much context calls a tool."""
    tools = {name: service_tools(s, slot_descriptions) for name, s in services.items()}
    return [dialogue_lines(d, tools, 0, max_results, replies=True)[-1] for d in dialogues]


def read_dialogues(split: str) -> list[dict]:
    return json.loads((DATA / split / "dialogues_subset.json").read_text(encoding="utf-8"))


def sample(items: list, n: int, seed: int) -> list:
    """A seeded sample of `n` items in their original order; all of them when n is 0."""
    if not n or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# --------------------------------------------------------------------------- spec

def spec_document(tools: Sequence[dict], log: Path, base: str) -> dict:
    """The compiler spec: every tool of train and dev, train's converted log as the teacher."""
    return {
        "name": "sgd-agent",
        "task": "agent",
        "description": DESCRIPTION,
        "tools": [{"name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"]} for t in tools],
        "teacher": {"logs": [str(log)]},
        # Each call point is its own example, and points of one dialogue share most of their
        # context: near-duplicate removal would throw real calls away, so only exact repeats go.
        "data": {"holdout": 0.05, "seed": 0, "pii_scrub": False, "near_duplicate_threshold": 1.0},
        # A from-scratch student needs a far higher learning rate than a pretrained one.
        "student": {"base": base, "method": "sft", "epochs": 2, "batch_size": 8, "max_length": 2048,
                    "learning_rate": 1e-3 if base.startswith("scratch:") else 1e-4},
        # The benchmark reports int8 agreement (stages.export) and only stops on a broken export.
        "export": {"quantize": "int8", "max_new_tokens": 96, "min_parity": 0.5},
    }


# --------------------------------------------------------------------------- evaluation

def call_points(spec, chat, log: Path, lines: Sequence[dict]) -> list:
    """Each dev line as the prediction point the runtime sees: replayed like the training log,
    so the prompt is built exactly as for training, and the call is its last assistant turn."""
    from distill_compiler.students.causal.data import points
    from distill_compiler.teacher.logs import LogReader

    records = LogReader(spec, log.parent).replay((log.name,))
    return [points(record, spec, chat)[-1] for record in records]


def predict(decoder, chat, points: Sequence, constrain: bool, max_new_tokens: int) -> list:
    from distill_compiler.runtime.decoder import Agent

    return [decoder.complete(chat.render(p.prompt, add_generation_prompt=True), Agent(p.tools),
                             max_new_tokens, constrain=constrain) for p in points]


def method_accuracy(predicted: Sequence[dict | None], targets: Sequence[dict]) -> float | None:
    """The intent called, whatever service it was called on (SGD's method accuracy)."""
    from distill_compiler.metrics.structured import calls_of

    pairs = [(calls_of(p), calls_of(t)) for p, t in zip(predicted, targets) if calls_of(t)]
    hits = sum(bool(got) and method_of(got[0][0]) == method_of(want[0][0]) for got, want in pairs)
    return round(hits / len(pairs), 4) if pairs else None


def call_report(points: Sequence, completions: Sequence, depths: Sequence[int]) -> dict:
    from distill_compiler.metrics.structured import agent_report

    predicted = [c.message for c in completions]
    targets = [p.target for p in points]
    report = agent_report(predicted, targets, [p.tools for p in points], depths)
    return {"method_accuracy": method_accuracy(predicted, targets), **report}


def subset(points: Sequence, completions: Sequence, depths: Sequence[int],
           keep: Sequence[bool]) -> tuple[list, list, list]:
    rows = [(p, c, d) for p, c, d, k in zip(points, completions, depths, keep) if k]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def cascade_on_dev(evaluate_dir: Path, points: Sequence, completions: Sequence) -> dict:
    """The bundle's cascade policy (policy.json: the threshold evaluate fitted for the spec's
    target on the test split) applied to the constrained dev answers: how many it would send
    to the teacher, and how often what it keeps agrees with SGD's system turn."""
    from distill_compiler.metrics.structured import turn_agrees
    from distill_compiler.runtime.causal import CausalPolicy

    policy = CausalPolicy(json.loads((evaluate_dir / "policy.json").read_text()))
    routes = [policy.decide(policy.trigger_text(p.input), c.message, c.confidence, c.truncated)
              for p, c in zip(points, completions)]
    kept = [turn_agrees(c.message, p.target)
            for p, c, r in zip(points, completions, routes) if r.route == "student"]
    escalated = sum(r.route == "teacher" for r in routes)
    return {"threshold": policy.threshold, "n": len(points),
            "escalation_rate": round(escalated / len(points), 4) if points else None,
            "accepted_agreement": round(sum(kept) / len(kept), 4) if kept else None,
            "rules": {rule: sum(r.rule == rule for r in routes)
                      for rule in sorted({r.rule for r in routes})}}


def tokens_per_second(decoders: dict, chat, points: Sequence, max_new_tokens: int) -> dict:
    """Constrained greedy decoding of the same prompts by each decoder, alternating per prompt
    (after one warm-up prompt each), so machine noise hits all alike. A completion's seconds
    cover prefill, masks and decoding: these are end-to-end tokens per second of an answer."""
    from distill_compiler.runtime.decoder import Agent

    totals = {name: [0, 0.0] for name in decoders}
    for i, point in enumerate(points):
        prompt = chat.render(point.prompt, add_generation_prompt=True)
        order = list(decoders.items()) if i % 2 == 0 else list(reversed(decoders.items()))
        for name, decoder in order:
            completion = decoder.complete(prompt, Agent(point.tools), max_new_tokens, constrain=True)
            if i:  # the first prompt warms each decoder up
                totals[name][0] += completion.new_tokens
                totals[name][1] += completion.seconds
    return {name: {"new_tokens": n, "seconds": round(s, 3),
                   "tokens_per_s": round(n / s, 1) if s else None}
            for name, (n, s) in totals.items()}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = decoder_parser(__doc__.split("\n\n")[0], WORK / "sgd", "dev")
    parser.add_argument("--train-dialogues", type=int, default=100,
                        help="seeded sample of train dialogues (0: all 2,772)")
    parser.add_argument("--dev-points", type=int, default=150,
                        help="seeded sample of dev call points to report on (0: all 1,526)")
    parser.add_argument("--dev-replies", type=int, default=50,
                        help="seeded sample of dev turns that call nothing, scored beside the "
                             "call points so that \"no call\" is a class (0: none)")
    parser.add_argument("--train-traces", choices=("dialogues", "calls"), default="dialogues",
                        help="calls: one training line per call point, cut to --context-turns; "
                             "dialogues: one line per whole dialogue, every system turn trained "
                             "(dev then keeps whole contexts too)")
    parser.add_argument("--context-turns", type=int, default=None,
                        help="with --train-traces calls: dialogue turns of context kept before "
                             "each call (default 4; 0: all)")
    parser.add_argument("--max-results", type=int, default=1,
                        help="results of an earlier call kept in its tool message (0: all)")
    parser.add_argument("--slot-descriptions", action="store_true",
                        help="describe each slot in the tool schemas (helps unseen services; "
                             "prompts grow by a third)")
    parser.add_argument("--unconstrained", action=argparse.BooleanOptionalAction, default=True,
                        help="also decode dev without the constraint (--no-unconstrained halves "
                             "the dev time, e.g. for the zero-shot floor)")
    parser.add_argument("--speed-points", type=int, default=20,
                        help="dev points decoded by both fp32 and int8 for tokens/s")
    args = parser.parse_args(argv)

    services = read_schemas([DATA / "train" / "schema.json", DATA / "dev" / "schema.json"])
    if args.train_traces == "dialogues" and args.context_turns:
        parser.error("--context-turns cuts call points; whole dialogues keep whole contexts, "
                     "and so do their dev points (use --train-traces calls to cut both)")
    if args.context_turns is None:
        args.context_turns = 4 if args.train_traces == "calls" else 0
    options = (args.context_turns, args.max_results, args.slot_descriptions)
    train_dialogues = sample(read_dialogues("train"), args.train_dialogues, args.seed)
    train = (whole_dialogues(train_dialogues, services, args.max_results, args.slot_descriptions)
             if args.train_traces == "dialogues" else convert(train_dialogues, services, *options))
    dev_lines = convert(read_dialogues("dev"), services, *options, replies=True)
    dev = [*sample([x for x in dev_lines if x["meta"]["kind"] == "call"], args.dev_points, args.seed),
           *(sample([x for x in dev_lines if x["meta"]["kind"] == "reply"], args.dev_replies,
                    args.seed) if args.dev_replies else [])]
    seen = {service for d in train_dialogues for service in d["services"]}
    train_log = write_jsonl(args.workdir / "train.jsonl", train)
    dev_log = write_jsonl(args.workdir / "dev.jsonl", dev)
    tools = [t for s in services.values() for t in service_tools(s, args.slot_descriptions)]
    spec_path = write_spec(args.workdir, spec_document(tools, train_log, args.base),
                           "benchmarks/sgd_agent.py from ../shared/datasets/sgd (CC BY-SA 4.0)")
    compiled = compile_spec(spec_path, args.sets, args.until)
    spec = compiled.spec
    results = {
        "command": command("sgd_agent.py", argv),
        "student_base": spec.student.base,
        "from_scratch": spec.student.base.startswith("scratch:"),
        "data": {"train_dialogues": args.train_dialogues or "all", "train_traces": args.train_traces,
                 "train_lines": len(train),
                 "train_calls": sum(map(calls_in, train)),
                 "dev_calls": sum(x["meta"]["kind"] == "call" for x in dev),
                 "dev_replies": sum(x["meta"]["kind"] == "reply" for x in dev),
                 "services_seen_in_train": sorted(seen), "context_turns": args.context_turns or "all",
                 "max_results": args.max_results or "all", "tools_in_spec": len(tools)},
        "compile_seconds": compiled.seconds,
        "stages": compiled.stages(),
    }
    artifacts = compiled.artifacts
    if "export" in artifacts:
        results.update(evaluate_dev(spec, artifacts, dev_log, dev, seen, args))
    write_results(args.workdir, results)


def evaluate_dev(spec, artifacts: dict[str, Path], dev_log: Path, dev: list[dict],
                 seen: set[str], args) -> dict:
    """Dev points through the shipped decoder, constrained and not (overall, and apart for
    services train showed and ones it never did), the bundle's cascade on the constrained
    answers, then tokens/s of the fp32 graph against the shipped one."""
    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.runtime.decoder import Decoder

    export_dir = artifacts["export"]
    chat = ChatFormat.from_dict(json.loads((export_dir / "chat.json").read_text()))
    points = call_points(spec, chat, dev_log, dev)
    depths = [line["meta"]["depth"] for line in dev]
    groups = {"seen": [line["meta"]["service"] in seen for line in dev]}
    groups["unseen"] = [not s for s in groups["seen"]]
    shipped = Decoder(export_dir, threads=args.threads)  # model.onnx, quantized as the spec says
    fp32 = Decoder(export_dir, threads=args.threads, model="model.fp32.onnx")
    budget = spec.export.max_new_tokens
    started = time.perf_counter()
    constrained = predict(shipped, chat, points, True, budget)
    free = predict(shipped, chat, points, False, budget) if args.unconstrained else None
    return {
        "shipped_quantize": spec.export.quantize,
        "dev_seconds": round(time.perf_counter() - started, 1),
        "dev_constrained": call_report(points, constrained, depths),
        **({"dev_unconstrained": call_report(points, free, depths)} if free is not None else {}),
        **{f"dev_constrained_{name}_services": call_report(*subset(points, constrained, depths, keep))
           for name, keep in groups.items()},
        **{f"dev_unconstrained_{name}_services": call_report(*subset(points, free, depths, keep))
           for name, keep in groups.items() if free is not None},
        # evaluate fits the cascade's threshold; it runs with --until evaluate (or bundle)
        **({"dev_cascade": cascade_on_dev(artifacts["evaluate"], points, constrained)}
           if "evaluate" in artifacts else {}),
        "tokens_per_second": {
            "prompts": max(0, min(args.speed_points, len(points)) - 1),
            "threads": args.threads, "cpu_count": os.cpu_count(),
            **tokens_per_second({"onnx_fp32": fp32, f"onnx_{spec.export.quantize}": shipped},
                                chat, points[:args.speed_points], budget)},
    }


if __name__ == "__main__":
    main()
