"""Ask the teacher for training data, or replay its recorded logs.

Two kinds of teacher request, so that the student learns from the teacher's answers and not
from what the generator meant to write:
1. generation: a batch of `BATCH` new inputs per (cohort, subject, register, batch index);
   the prompt is fixed for that tuple, so raising `data.per_intent` only adds new batches
   (and uses more of the last one) while every earlier request hits the cache;
2. answering: every input is then labelled (classify), extracted (extract) or played through
   (agent) by the teacher at temperature 0.

Replayed log records come first, then seeds from the spec, then generated ones, each in a
fixed order, so examples.jsonl is deterministic whatever order answers arrive in.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import OUT_OF_SCOPE_FAR, OUT_OF_SCOPE_NEAR
from ..errors import StageError
from ..spec.models import wants_generation
from ..teacher.client import gather_or_cancel

VERSION = "3"  # 3: hard negatives carry their pair; stats list the confusable pairs
# 2: out-of-scope probes in two cohorts, near and far (curate holds them out)
KIND = "examples"
KEYED_ON = ("task", "description", "input", "output", "intents", "tools", "scenarios", "refusals",
            "teacher", "data")
INPUTS = ()

BATCH = 10  # inputs asked for per generation request; part of every generation prompt
MAX_TOOL_ROUNDS = 4  # assistant tool-call rounds per user turn before the trace is cut


def external_files(spec, spec_dir: Path) -> dict[str, Path]:
    files = {f"teacher.logs[{i}]": spec_dir / p for i, p in enumerate(spec.teacher.logs)}
    files.update({f"teacher.pool[{i}]": spec_dir / p for i, p in enumerate(spec.teacher.pool)})
    if spec.teacher.templates:
        folder = spec_dir / spec.teacher.templates
        templates = sorted(folder.glob("*.j2")) if folder.is_dir() else []
        # A missing folder is reported by the pipeline as a missing file under this label.
        files.update({f"teacher.templates/{p.name}": p for p in templates}
                     or {"teacher.templates": folder})
    return files


def run(ctx) -> dict:
    from ..data import records
    from ..teacher.logs import LogReader

    spec = ctx.spec
    examples = LogReader(spec, ctx.spec_dir).replay(spec.teacher.logs)
    stats = {"requests": 0, "cached": 0, "cost_usd": 0.0, "prompt_tokens": 0,
             "completion_tokens": 0, "rejected": {}}
    pairs = []
    # A model named only for serving escalations is not contacted by a logs-only build.
    if asks_teacher(spec):
        found = find_pairs(spec, ctx.spec_dir, examples)
        if found:
            ctx.log("generate: confusable pairs found: " + ", ".join(
                f"{a} ~ {b} (cosine {c:.3f})" for a, b, c in found))
        generated, usage, rejected, extra = asyncio.run(_generate(ctx, examples, found))
        examples += generated
        pairs = pair_stats(spec, found, generated)
        stats.update(requests=usage.requests, cached=usage.cached,
                     cost_usd=round(usage.cost_usd, 6), prompt_tokens=usage.prompt_tokens,
                     completion_tokens=usage.completion_tokens, rejected=dict(sorted(rejected.items())),
                     **extra)
    if not examples:
        raise StageError("generate", "no examples: the logs are empty and nothing was generated",
                         "add teacher.logs, intent examples or set data.per_intent")
    stats["by_cohort"] = dict(sorted(Counter(e["cohort"] for e in examples).items()))
    stats["by_source"] = dict(sorted(Counter(e["source"] for e in examples).items()))
    stats["confusable_pairs"] = pairs
    records.write_jsonl(ctx.out / "examples.jsonl", examples)
    (ctx.out / "stats.json").write_text(records.canonical(stats) + "\n")
    ctx.log(f"generate: {len(examples)} examples, {stats['requests']} teacher requests "
            f"({stats['cached']} cached), ${stats['cost_usd']:.4f}")
    return {"teacher_requests": stats["requests"], "cached_requests": stats["cached"],
            "cost_usd": stats["cost_usd"], "examples": len(examples)}


def asks_teacher(spec) -> bool:
    """Whether this spec sends the teacher anything: generation, or a pool to label."""
    return bool(spec.teacher.models and (
        wants_generation(spec.task, spec.data, spec.scenarios) or spec.teacher.pool))


async def _generate(ctx, known: list[dict], found):
    """(generated, pool and failure-round examples, usage, rejected counts, the pool's and the
    failure rounds' stats when the spec has them). `found`: the confusable pairs find_pairs
    gave."""
    from ..teacher.cache import RequestCache
    from ..teacher.client import BudgetExhausted, Teacher
    from ..teacher.prompts import Prompts

    spec = ctx.spec
    templates = ctx.spec_dir / spec.teacher.templates if spec.teacher.templates else None
    cache = RequestCache.at(ctx.cache_root)
    if cache.recovered:
        ctx.log(f"generate: {cache.recovered}")
    try:
        if spec.teacher.batch:
            from ..teacher.batch import BatchTeacher

            teacher = BatchTeacher(spec.teacher, cache, log=ctx.log)
        else:
            teacher = Teacher(spec.teacher, cache)
        generator = Generator(spec, teacher, Prompts(templates), found)
        progress = ctx.reporter.progress("teacher", None)
        try:
            generated = await generator.run(progress)
        except BudgetExhausted as stop:
            # Restated now that requests in flight when it was hit have finished and been paid.
            raise BudgetExhausted(stop.what, teacher.usage) from None
        added, extra = await label_beyond_generation(spec, ctx.spec_dir, ctx.cache_root, generator,
                                                     known + generated, ctx.log)
        return generated + added, teacher.usage, generator.rejected, extra
    finally:
        cache.close()


async def label_beyond_generation(spec, spec_dir: Path, cache_root: Path, generator,
                                  known: list[dict], log) -> tuple[list[dict], dict]:
    """What the teacher labels after generation, each step seeing all labelled before it:
    the pool's picks, then the failure rounds' examples; and their stats by name."""
    added: list[dict] = []
    extra: dict = {}
    if spec.teacher.pool:
        selection = pool_selection(spec, spec_dir, cache_root, generator, log)
        added += await selection.run(read_pool(spec, spec_dir), known)
        extra["pool"] = selection.stats()
    if spec.data.rounds:
        rounds = failure_rounds(spec, spec_dir, cache_root, generator, log)
        added += await rounds.run(known + added)
        extra["failure_rounds"] = rounds.stats()
    return added, extra


def failure_rounds(spec, spec_dir: Path, cache_root: Path, generator, log):
    """The rounds on the model's failures, writing and labelling through `generator`."""
    from ..data.failure_rounds import COHORT, FailureRounds
    from ..teacher.prompts import register_style

    async def write(writings) -> list[list[dict]]:
        return await gather_or_cancel([
            generator.ask(Ask(COHORT, template, {**variables, "n": BATCH}, BATCH, intended))
            for template, variables, intended in writings])

    styles = [register_style(register, language) for register, language in registers(spec.data)]
    return FailureRounds(spec, spec_dir, cache_root, write, styles, BATCH, generator.label_help, log)


def read_pool(spec, spec_dir: Path) -> list:
    from ..teacher.logs import LogReader

    return LogReader(spec, spec_dir).pool(spec.teacher.pool)


def pool_selection(spec, spec_dir: Path, cache_root: Path, generator, log):
    """The active selection over `teacher.pool`, labelling through `generator` (and its cache)."""
    from ..data.active import PoolSelection

    async def answer(text: str, cohort: str) -> dict:
        return await generator.answer(text, cohort, None)

    return PoolSelection(spec, spec_dir, cache_root, answer, log)


def estimate(spec, spec_dir: Path, cache_root: Path):
    """What run() would ask the teacher, counted without sending anything: an `Estimate`
    (teacher/estimate.py), or None when this spec sends the teacher nothing."""
    if not asks_teacher(spec):
        return None
    return asyncio.run(_estimate(spec, spec_dir, cache_root))


async def _estimate(spec, spec_dir: Path, cache_root: Path):
    """The dry run. A pool is selected for real, with the cached answers where there are
    some and stand-ins otherwise: on a rerun it picks what the last compile picked (all
    cached); on a first run its picks differ from the real ones, but not their number."""
    from ..teacher.estimate import DryTeacher, open_cache
    from ..teacher.logs import LogReader
    from ..teacher.prompts import Prompts

    templates = spec_dir / spec.teacher.templates if spec.teacher.templates else None
    replayed = LogReader(spec, spec_dir).replay(spec.teacher.logs)
    found = find_pairs(spec, spec_dir, replayed)  # as run() finds them: their requests count
    cache = open_cache(cache_root)
    try:
        teacher = DryTeacher.for_teacher(spec.teacher, cache, stand_in(spec))
        generator = Generator(spec, teacher, Prompts(templates), found)
        generated = await generator.run(lambda n=1: None)
        await label_beyond_generation(spec, spec_dir, cache_root, generator,
                                      replayed + generated, lambda message: None)
        return teacher.estimate()
    finally:
        if cache is not None:
            cache.close()


# A generated input or user turn of typical length, for the requests that depend on one.
TYPICAL_INPUT = "Hi, I was charged twice for my subscription this month, can you refund one?"
TYPICAL_REPLY = ("I'm sorry about the double charge. I've checked your account and refunded "
                 "the second payment; it will be back on your card within 5 business days.")


def stand_in(spec):
    """The answer a dry run gives each kind of request not in the cache (teacher/estimate.py):
    of typical length, and shaped so that Generator asks what depends on it."""
    import itertools
    import json

    from ..spec.models import class_labels
    from ..teacher.estimate import StandIn

    numbers = itertools.count()  # generated inputs differ, so their labels are distinct requests
    label = class_labels(spec.intents, spec.refusals)[0]
    fields = (spec.output.schema_.get("properties", {}) if spec.task == "extract" else {})

    def answer(request) -> StandIn:
        if request.kind == "generation":
            items = [f"{TYPICAL_INPUT} ({next(numbers)})" for _ in range(BATCH)]
            return StandIn(json.dumps({"items": items}))
        if request.kind in ("label", "label_vote"):
            top = [{"token": label, "logprob": 0.0, "top": []}] if request.logprobs else None
            return StandIn(label, logprobs=top)
        if request.kind == "extraction":
            return StandIn(json.dumps({name: "a typical value" for name in fields}))
        if request.kind == "agent_user":
            return StandIn(TYPICAL_INPUT)
        if request.kind == "agent_turn":
            return StandIn(TYPICAL_REPLY)
        return StandIn("{}")
    return answer


# --------------------------------------------------------------------------- confusable pairs

def find_pairs(spec, spec_dir: Path, replayed: list[dict]) -> list[tuple[str, str, float]]:
    """The intent pairs nearest in embedding space (data/confusable.py), found once per run
    from the spec and the replayed log records; none unless hard negatives are generated."""
    if spec.task != "classify" or not (spec.data.confusable_pairs and spec.data.hard_negatives):
        return []
    from ..data.confusable import found_pairs

    return found_pairs(spec, spec_dir, replayed)


def pair_stats(spec, found: list[tuple[str, str, float]], generated: list[dict]) -> list[dict]:
    """stats.json's confusable_pairs: each pair that got hard negatives, named or found, and
    how many hard-negative examples it produced in both directions."""
    from ..data.confusable import named_pairs

    if spec.task != "classify" or not spec.data.hard_negatives:
        return []
    made = Counter(tuple(sorted(e["provenance"]["pair"])) for e in generated
                   if e["cohort"] == "hard_negative")
    rows = [{"pair": list(p), "source": "named", "examples": made[p]}
            for p in named_pairs(spec.intents)]
    rows += [{"pair": [a, b], "source": "found", "cosine": round(c, 4), "examples": made[(a, b)]}
             for a, b, c in found]
    return rows


# --------------------------------------------------------------------------- what to ask for

@dataclass(frozen=True)
class Ask:
    """One generation request and how many of its BATCH inputs are used."""

    cohort: str
    template: str
    variables: dict = field(hash=False)
    take: int
    intended: str | None  # the label the generator was asked for; the teacher decides
    # Hard negatives: (target, other). Kept out of `variables`, so that it never reaches the
    # prompt (or its cache key); it goes to the examples' provenance.
    pair: tuple[str, str] | None = None


@dataclass(frozen=True)
class Seed:
    text: str
    intended: str


def registers(data) -> list[tuple[str, str | None]]:
    """(register, language) pairs to paraphrase into; `noise` is curate's, not the teacher's."""
    out: list[tuple[str, str | None]] = []
    for register in data.registers:
        if register == "multilingual":
            out += [("multilingual", lang) for lang in data.languages]
        elif register != "noise":
            out.append((register, None))
    return out or [("formal", None)]


def spread(count: int, cohort: str, template: str, variables: dict, intended: str | None,
           regs: list[tuple[str, str | None]], pair: tuple[str, str] | None = None) -> list[Ask]:
    """`count` inputs dealt round-robin over registers, in batches of BATCH per register.

    Input i goes to register i % R as its (i // R)-th input, so growing `count` only extends
    each register's list: earlier batches keep their prompts (and their cache entries).
    """
    from ..teacher.prompts import register_style

    asks = []
    for r, (register, language) in enumerate(regs):
        mine = len(range(r, count, len(regs)))
        for batch in range(math.ceil(mine / BATCH)):
            name = f"{cohort}:{register}" if cohort == "paraphrase" else cohort
            asks.append(Ask(name, template, {**variables, "style": register_style(register, language),
                                             "batch": batch, "n": BATCH},
                            min(BATCH, mine - batch * BATCH), intended, pair))
    return asks


def plan_asks(spec, found=()) -> list[Ask]:
    """Every generation request, in a fixed order. `found`: the (a, b, cosine) intent pairs
    find_pairs gave, which get hard negatives beside the pairs the spec names."""
    from ..data.confusable import named_pairs

    data, regs = spec.data, registers(spec.data)
    intents = {i.name: i for i in spec.intents}
    asks: list[Ask] = []
    if spec.task == "extract":
        for intent in spec.intents or (None,):
            asks += spread(data.per_intent, "paraphrase", "extract_input",
                           {"intent": intent, "output_schema": spec.output.schema_},
                           None, regs)
        return asks
    if spec.task != "classify":
        return asks
    for intent in spec.intents:
        asks += spread(data.per_intent, "paraphrase", "paraphrase", {"intent": intent},
                       intent.name, regs)
    pairs = sorted({*named_pairs(spec.intents), *((a, b) for a, b, _ in found)})
    for a, b in pairs:
        for target, other in ((a, b), (b, a)):
            half = data.hard_negatives // 2 + (data.hard_negatives % 2 if target == a else 0)
            asks += spread(half, "hard_negative", "hard_negative",
                           {"target": intents[target], "other": intents[other]}, target, regs,
                           (target, other))
    for refusal in spec.refusals:
        asks += spread(data.per_intent, "refusal_probe", "refusal_probe", {"refusal": refusal},
                       refusal.name, regs)
        # Look-alikes: a quarter as many as probes, enough to teach where refusal stops.
        asks += spread(math.ceil(data.per_intent / 4), "refusal_lookalike", "refusal_lookalike",
                       {"refusal": refusal, "intents": spec.intents}, None, regs)
    # Near-domain probes (what this service gets but no intent covers) are the hard ones for the
    # detector; far ones (small talk, other services) the common ones. Half of each.
    near = math.ceil(data.out_of_scope / 2)
    asks += spread(near, OUT_OF_SCOPE_NEAR, "out_of_scope_near", {"intents": spec.intents},
                   "out_of_scope", regs)
    asks += spread(data.out_of_scope - near, OUT_OF_SCOPE_FAR, "out_of_scope",
                   {"intents": spec.intents}, "out_of_scope", regs)
    return asks


def seeds(spec) -> list[Seed]:
    if spec.task not in ("classify", "extract"):
        return []
    return ([Seed(t, i.name) for i in spec.intents for t in i.examples]
            + [Seed(t, r.name) for r in spec.refusals for t in r.examples])


# --------------------------------------------------------------------------- asking

class Generator:
    def __init__(self, spec, teacher, prompts, found=()):
        from ..data import records
        from ..spec.models import OUT_OF_SCOPE, class_labels

        self.spec, self.teacher, self.prompts = spec, teacher, prompts
        self.found = found  # intent pairs that get hard negatives beside the named ones
        self.labels = class_labels(spec.intents, spec.refusals)
        self.label_help = ([{"name": i.name, "description": i.description} for i in spec.intents]
                           + [{"name": r.name, "description": r.description} for r in spec.refusals]
                           + [{"name": OUT_OF_SCOPE, "description": "none of the above"}])
        self.field = records.message_field(spec.input.schema_)
        self.rejected: Counter[str] = Counter()
        self.progress = lambda n=1: None

    async def run(self, progress) -> list[dict]:
        self.progress = progress
        if self.spec.task == "agent":
            jobs = [self.conversation(s, c) for s in self.spec.scenarios
                    for c in range(max(1, self.spec.data.per_intent))]
            return [r for r in await gather_or_cancel(jobs) if r is not None]
        asks = plan_asks(self.spec, self.found)
        if (asks or seeds(self.spec)) and self.field is None:
            raise StageError("generate", "input.schema has no string property for generated text",
                             "add one (e.g. `message: {type: string}`) or use teacher.logs only")
        seeded = [self.answer(s.text, "seed", s.intended) for s in seeds(self.spec)]
        batches = [self.ask(a) for a in asks]
        done = await gather_or_cancel([*seeded, *batches])
        out = [r for r in done[:len(seeded)] if r is not None]
        for batch in done[len(seeded):]:
            out += batch
        return out

    async def ask(self, ask: Ask) -> list[dict]:
        from ..teacher.client import BadReply, Request, json_schema_format, parse_json

        schema = {"type": "object", "required": ["items"], "properties": {"items": {
            "type": "array", "items": {"type": "string", "minLength": 1},
            "minItems": BATCH, "maxItems": BATCH}}}
        variables = {"description": self.spec.description, **ask.variables}
        request = Request(self.prompts.chat("writer", ask.template, **variables),
                          temperature=self.spec.teacher.temperature,
                          response_format=json_schema_format("generated_inputs", schema),
                          kind="generation")
        reply = await self.teacher.complete(request)
        self.progress(1)
        try:
            items = parse_json(reply.content, schema)["items"]
        except BadReply as bad:
            self.rejected[f"generation_{bad.reason}"] += 1
            return []
        answered = await gather_or_cancel(
            [self.answer(text, ask.cohort, ask.intended, reply.key, ask.pair)
             for text in items[:ask.take]])
        return [r for r in answered if r is not None]

    async def answer(self, text: str, cohort: str, intended: str | None,
                     generated_by: str | None = None, pair: tuple[str, str] | None = None) -> dict:
        from ..data import records

        text = text.strip()
        input = {self.field: text}
        if self.spec.task == "extract":
            target, soft, replies = await self.extract(text)
        else:
            target, soft, replies = await self.label(text)
        self.progress(1)
        provenance = {"request": replies[0].key, "model": replies[0].model or self.spec.teacher.models[0],
                      "cost_usd": round(sum(r.cost_usd for r in replies), 8), "log": None,
                      "intended": intended, "generated_by": generated_by}
        if pair is not None:
            provenance["pair"] = list(pair)
        return records.example(input=input, target=target, soft=soft, cohort=cohort,
                               source="teacher", provenance=provenance)

    async def label(self, text: str):
        """The teacher's label and soft distribution (see teacher.label_distribution)."""
        from ..teacher.client import Request
        from ..teacher.labels import (
            label_distribution,
            label_of,
            majority,
            vote_distribution,
        )

        teacher_cfg = self.spec.teacher
        messages = self.prompts.chat("label", "message", description=self.spec.description,
                                     labels=self.label_help, text=text)
        first = await self.teacher.complete(Request(
            messages, temperature=0.0, max_tokens=16,
            logprobs=teacher_cfg.soft_labels == "logprobs", kind="label"))
        replies = [first]
        chosen = label_of(first.content, self.labels)
        if teacher_cfg.soft_labels == "none" or chosen is None:
            return chosen or first.content, None, replies
        if teacher_cfg.soft_labels == "logprobs" and first.logprobs:
            return chosen, label_distribution(first.logprobs, self.labels, chosen), replies
        # Sampled votes: asked for, or the provider gave no logprobs. The temperature-0 answer
        # is the first vote and stays the target unless the votes clearly disagree.
        more = await gather_or_cancel([self.teacher.complete(Request(
            messages, temperature=teacher_cfg.temperature, max_tokens=16, sample=i,
            kind="label_vote"))
            for i in range(1, teacher_cfg.samples)])
        replies += more
        soft = vote_distribution([chosen] + [label_of(r.content, self.labels) for r in more],
                                 self.labels)
        return majority(soft, self.labels) or chosen, soft, replies

    async def extract(self, text: str):
        from ..teacher.client import BadReply, Request, json_schema_format, parse_json

        schema = self.spec.output.schema_
        reply = await self.teacher.complete(Request(
            self.prompts.chat("extract", "message", description=self.spec.description,
                              output_schema=schema, text=text),
            temperature=0.0, response_format=json_schema_format("extraction", schema),
            kind="extraction"))
        try:
            return parse_json(reply.content, schema), None, [reply]
        except BadReply:
            # Kept as the raw answer: curate drops it under output_schema and counts it.
            return reply.content, None, [reply]

    # ----------------------------------------------------------------- agent traces

    async def conversation(self, scenario, index: int) -> dict | None:
        """One multi-turn trace: the teacher plays the user, the agent (with the spec's
        tools) and, where a tool lists no `results`, the tool itself."""
        from ..data import records
        from ..teacher.client import Request

        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                    "parameters": t.parameters}}
                 for t in self.spec.tools if not scenario.tools or t.name in scenario.tools]
        system = {"role": "system", "content": self.prompts.text(
            "agent", description=self.spec.description)}
        trace: list[dict] = []
        replies = []
        for turn in range(scenario.turns):
            transcript = [m for m in trace if m["role"] in ("user", "assistant") and m.get("content")]
            user = await self.teacher.complete(Request(
                [{"role": "user", "content": self.prompts.text(
                    "agent_user", scenario=scenario, conversation=index, turn=turn,
                    transcript=transcript)}],
                temperature=self.spec.teacher.temperature, max_tokens=300, kind="agent_user"))
            replies.append(user)
            if not user.content:
                self.rejected["agent_empty_user_turn"] += 1
                break
            trace.append({"role": "user", "content": user.content.strip()})
            for _ in range(MAX_TOOL_ROUNDS):
                reply = await self.teacher.complete(Request([system, *trace], temperature=0.0,
                                                            tools=tools, kind="agent_turn"))
                replies.append(reply)
                message = {"role": "assistant", "content": reply.content}
                if reply.tool_calls:
                    message["tool_calls"] = reply.tool_calls
                trace.append(message)
                if not reply.tool_calls:
                    break
                for call in reply.tool_calls:
                    trace.append({"role": "tool", "tool_call_id": call["id"],
                                  "content": await self.tool_result(call, replies)})
        self.progress(1)
        if not trace:
            return None
        provenance = {"request": replies[0].key, "model": replies[0].model or self.spec.teacher.models[0],
                      "cost_usd": round(sum(r.cost_usd for r in replies), 8), "log": None,
                      "scenario": scenario.description}
        return records.example(input=None, target=None, messages=trace, cohort="scenario",
                               source="teacher", provenance=provenance)

    async def tool_result(self, call: dict, replies: list) -> str:
        from ..data import records
        from ..teacher.client import BadReply, Request, json_schema_format, parse_json

        tool = next((t for t in self.spec.tools if t.name == call["function"]["name"]), None)
        if tool is None:
            return records.canonical({"error": f"unknown tool {call['function']['name']}"})
        if tool.results:
            # Deterministic pick among the spec's example results, keyed by the call.
            pick = int(records.example_id(call["function"], None), 16) % len(tool.results)
            return records.canonical(tool.results[pick])
        schema = {"type": "object"}
        reply = await self.teacher.complete(Request(
            [{"role": "user", "content": self.prompts.text(
                "tool_result", tool=tool, arguments=call["function"]["arguments"])}],
            temperature=0.0, response_format=json_schema_format("tool_result", schema),
            kind="tool_result"))
        replies.append(reply)
        try:
            return records.canonical(parse_json(reply.content, schema))
        except BadReply as bad:
            self.rejected[f"tool_result_{bad.reason}"] += 1
            return records.canonical({"error": "the tool failed"})
