"""The spec rules that span fields: schemas, names, what each task needs, references between
sections, escalation and teacher. Each returns findings (path, message, hint) instead of raising,
so load reports every problem at once, located by dotted path.
"""

from __future__ import annotations

import difflib
import re

import jsonschema

from .models import OUT_OF_SCOPE, Spec, wants_generation

# --------------------------------------------------------------------------- cross-field rules

Finding = tuple[tuple, str, str | None]  # (path, message, hint)
# The models litellm's batch support reaches through an OpenAI-style /v1/batches endpoint
# (teacher/batch.py); other providers' batch APIs differ in shape.
BATCH_PREFIX = "openai/"


def check_spec(spec: Spec) -> list[Finding]:
    """Every rule that spans fields; each returns findings instead of raising."""
    return [
        *check_schemas(spec), *check_names(spec), *check_task_needs(spec),
        *check_references(spec), *check_escalation(spec), *check_teacher(spec),
        *check_data(spec),
    ]


def check_schemas(spec: Spec) -> list[Finding]:
    found = []
    blocks = [(("input", "schema"), spec.input.schema_)]
    if spec.output:
        blocks.append((("output", "schema"), spec.output.schema_))
    blocks += [(("tools", i, "parameters"), t.parameters) for i, t in enumerate(spec.tools)]
    for path, schema in blocks:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = path + tuple(exc.path)
            found.append((where, f"invalid JSON Schema: {exc.message}",
                          f"see {validator.META_SCHEMA.get('$schema', 'the JSON Schema spec')}"))
    for i, tool in enumerate(spec.tools):
        if tool.parameters.get("type") != "object":
            found.append((("tools", i, "parameters"), "tool parameters must be an object schema",
                          "set `type: object`"))
    if not found:
        found += check_enforceable(spec)
    return found


def check_enforceable(spec: Spec) -> list[Finding]:
    """The runtime constrains extractions and tool arguments to their schemas through
    llguidance, so a schema it cannot compile is an error here, at the keyword's line, rather
    than a bundle that fails to load."""
    from ..runtime.enforceable import schema_problems

    blocks = [(("tools", i, "parameters"), t.parameters) for i, t in enumerate(spec.tools)]
    if spec.task == "extract" and spec.output:
        blocks.append((("output", "schema"), spec.output.schema_))
    found = []
    for path, schema in blocks:
        for where, message in schema_problems(schema):
            found.append((path + where, message, None))  # the message carries its reason
    return found


def check_names(spec: Spec) -> list[Finding]:
    found = []
    seen: dict[str, str] = {}
    for section, items in (("intents", spec.intents), ("refusals", spec.refusals)):
        for i, item in enumerate(items):
            if item.name in seen:
                found.append(((section, i, "name"), f"'{item.name}' is already used in {seen[item.name]}",
                              "names must be unique across intents and refusals"))
            elif item.name == OUT_OF_SCOPE:
                found.append(((section, i, "name"), f"'{OUT_OF_SCOPE}' is reserved",
                              "out-of-scope is built in; pick another name"))
            seen.setdefault(item.name, section)
    claimed: dict[str, str] = {}
    for i, intent in enumerate(spec.intents):
        for j, raw in enumerate(intent.log_labels):
            if claimed.setdefault(raw, intent.name) != intent.name:
                found.append((("intents", i, "log_labels", j),
                              f"log label {raw!r} already means intent '{claimed[raw]}'",
                              "a log label can mean one intent only"))
    tools: set[str] = set()
    for i, tool in enumerate(spec.tools):
        if tool.name in tools:
            found.append((("tools", i, "name"), f"duplicate tool '{tool.name}'", "rename one"))
        tools.add(tool.name)
    return found


def check_task_needs(spec: Spec) -> list[Finding]:
    found = []
    if spec.task == "classify" and len(spec.intents) + len(spec.refusals) < 2:
        found.append((("intents",), "classify needs at least two intents (refusals count)",
                      "add intents"))
    if spec.task == "extract" and spec.output is None:
        found.append((("output",), "extract needs output.schema", "add `output: {schema: ...}`"))
    if spec.task == "agent" and not spec.tools:
        found.append((("tools",), "agent needs at least one tool", "add `tools:`"))
    if spec.student.method == "gkd" and not spec.student.teacher_model:
        found.append((("student", "teacher_model"), "method gkd needs a local teacher model",
                      "set student.teacher_model or use method: sft"))
    if spec.task == "classify" and spec.student.method in ("sft", "gkd"):
        found.append((("student", "method"), f"method {spec.student.method} is for extract/agent",
                      "use kd or ce for classify"))
    if spec.task == "classify" and spec.student.epochs == 0:
        found.append((("student", "epochs"), "epochs 0 (no training) is for extract/agent",
                      "a classifier needs at least one epoch: set epochs to 1 or more"))
    if spec.task != "classify" and spec.student.layers is not None:
        found.append((("student", "layers"), "layers is for classify students",
                      "drop student.layers; a decoder student keeps its base's depth"))
    if spec.task != "classify" and spec.student.method in ("kd", "ce"):
        found.append((("student", "method"), f"method {spec.student.method} is for classify",
                      "use sft or gkd"))
    return found


def check_references(spec: Spec) -> list[Finding]:
    found = []
    intents = {i.name for i in spec.intents}
    for i, intent in enumerate(spec.intents):
        for j, other in enumerate(intent.confusable_with):
            if other not in intents:
                found.append((("intents", i, "confusable_with", j), f"unknown intent '{other}'",
                               _choices(other, intents)))
            elif other == intent.name:
                found.append((("intents", i, "confusable_with", j),
                               "an intent cannot be confusable with itself", "remove it"))
    tools = {t.name for t in spec.tools}
    for i, scenario in enumerate(spec.scenarios):
        for j, tool in enumerate(scenario.tools):
            if tool not in tools:
                found.append((("scenarios", i, "tools", j), f"unknown tool '{tool}'",
                               _choices(tool, tools)))
    return found


def check_escalation(spec: Spec) -> list[Finding]:
    found = []
    intents = {i.name for i in spec.intents}
    for i, name in enumerate(spec.escalation.always):
        if name not in intents:
            found.append((("escalation", "always", i), f"unknown intent '{name}'",
                           _choices(name, intents)))
    for i, trigger in enumerate(spec.escalation.triggers):
        try:
            re.compile(trigger.pattern)
        except re.error as exc:
            found.append((("escalation", "triggers", i, "pattern"),
                           f"invalid regular expression: {exc}", "fix the pattern (Python re syntax)"))
    return found


def check_teacher(spec: Spec) -> list[Finding]:
    t = spec.teacher
    generation = wants_generation(spec.task, spec.data, spec.scenarios)
    if t.deployments:
        found = check_deployments(spec)
        if found:
            return found
    primary = t.deployments[0].model if t.deployments else t.model
    if t.batch and primary and not primary.startswith(BATCH_PREFIX):
        where = ("teacher", "deployments", 0, "model") if t.deployments else ("teacher", "model")
        what = "the first deployment" if t.deployments else "teacher.model"
        hint = (f"make {what} an {BATCH_PREFIX} model, at any OpenAI-compatible api_base, "
                "or set teacher.batch: false")
        return [(where, "teacher.batch goes through an OpenAI-style batch endpoint", hint)]
    if spec.data.rounds and spec.task != "classify":
        return [(("data", "rounds"), "failure rounds refit a label model: they are for classify specs",
                 "set data.rounds to 0")]
    if t.pool and spec.task == "agent":
        return [(("teacher", "pool"), "an agent spec cannot label a request pool: its examples are "
                 "whole conversations", "record them as teacher.logs, or describe scenarios")]
    if t.pool and not t.models:
        return [(("teacher", "pool"), "labelling the request pool asks for a live teacher",
                 "set teacher.model or teacher.deployments")]
    if not t.logs and not t.models:
        return [(("teacher",), "no teacher model and no logs",
                 "set teacher.model, teacher.deployments or teacher.logs")]
    if generation and not t.models:
        return [(("teacher", "model"), "data generation asks for a live teacher",
                 "set teacher.model, or set data.per_intent/hard_negatives/out_of_scope to 0")]
    return []


def check_data(spec: Spec) -> list[Finding]:
    # Found pairs get hard_negatives each, like named ones: with none asked for, finding them
    # would cost an encoder pass and change nothing.
    if spec.data.confusable_pairs and not spec.data.hard_negatives:
        return [(("data", "confusable_pairs"), "found pairs would get no examples: hard_negatives is 0",
                 "set data.hard_negatives, or confusable_pairs to 0")]
    return []


def check_deployments(spec: Spec) -> list[Finding]:
    """teacher.deployments replaces teacher.model and the connection fields beside it: each
    deployment carries its own, so one set at the teacher level would be ambiguous."""
    t = spec.teacher
    found = []
    for name in ("model", "api_base", "api_key_env"):
        if getattr(t, name) is not None:
            found.append((("teacher", name), f"teacher.{name} is set beside teacher.deployments",
                          "list it as a deployment instead" if name == "model"
                          else "set it on each deployment instead"))
    seen: dict[tuple, int] = {}
    for i, d in enumerate(t.deployments):
        first = seen.setdefault((d.model, d.api_base), i)
        if first != i:
            where = d.api_base or "its default endpoint"
            found.append((("teacher", "deployments", i),
                          f"the same deployment as teacher.deployments[{first}] ({d.model} at {where})",
                          "remove one, or give it another api_base"))
    return found


def _choices(name: str, options: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known: " + ", ".join(sorted(options)) if options else "define it first"
