"""The task spec: strict, frozen pydantic models, one section per pipeline stage.

Field docs are attribute docstrings: the single source for `distill show --docs`, the JSON
Schema in `specs/` and editor completion. Structural checks (types, enums, unknown keys) come
from pydantic; the rules that span fields live in `check_*` functions below and report every
problem at once, located by dotted path.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import yamlpos
from .errors import Problem, SpecError

JsonSchema = dict[str, Any]
Name = str  # constrained by NAME_PATTERN in the fields that use it

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
SPEC_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
OUT_OF_SCOPE = "out_of_scope"
# Fields that change how a stage runs but never what it produces: left out of cache keys, so
# raising a budget or the concurrency does not rebuild anything.
NOT_KEYED = {
    "teacher": {"max_concurrency", "max_retries", "timeout_s", "budget_usd", "max_requests"},
    "student": {"device"},
}
REGISTERS = ("formal", "terse", "slang", "typos", "multilingual", "noise")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SchemaBlock(Section):
    schema_: JsonSchema = Field(alias="schema")
    """JSON Schema (draft 2020-12 unless `$schema` says otherwise) for this side of the task."""


class Intent(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Label the student predicts; lower_snake_case."""
    description: str = Field(min_length=1)
    """What belongs to this intent, in a sentence or two; the teacher reads it."""
    examples: tuple[str, ...] = ()
    """A few real user messages of this intent; seeds for generation."""
    confusable_with: tuple[str, ...] = ()
    """Other intents users mix up with this one; hard negatives are generated between them."""


class Tool(Section):
    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    """Function name the agent calls."""
    description: str = Field(min_length=1)
    """When the agent should call this tool."""
    parameters: JsonSchema = {"type": "object", "properties": {}}
    """JSON Schema of the tool's arguments (an object schema)."""
    results: tuple[Any, ...] = ()
    """Example results the tool returns; used instead of teacher-simulated results when given."""


class Scenario(Section):
    description: str = Field(min_length=1)
    """A situation the agent must handle, e.g. 'customer wants to move a delivery date'."""
    tools: tuple[str, ...] = ()
    """Tools this scenario is expected to use."""
    turns: int = Field(default=3, ge=1, le=20)
    """Number of user turns in the generated conversation."""


class Refusal(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Label of the refusal class."""
    description: str = Field(min_length=1)
    """Which requests must be refused."""
    response: str = Field(min_length=1)
    """The fixed answer the runtime returns when this refusal fires."""
    examples: tuple[str, ...] = ()
    """Messages that must be refused; seeds for refusal probes."""


class Trigger(Section):
    pattern: str
    """Python regular expression; a match on the input escalates to the teacher."""
    reason: str | None = None
    """Shown as the route's reason; defaults to the pattern."""


class Escalation(Section):
    always: tuple[str, ...] = ()
    """Intents the student recognises but always hands to the teacher."""
    triggers: tuple[Trigger, ...] = ()
    """Patterns that escalate a request before the student is asked."""
    target_accuracy: float = Field(default=0.95, gt=0, le=1)
    """The cascade threshold is the lowest confidence whose accepted traffic reaches this accuracy."""


class Teacher(Section):
    model: str | None = None
    """Any litellm model string (`openai/gpt-4o`, `anthropic/claude-...`, `ollama/llama3`); omit to replay logs only."""
    api_base: str | None = None
    """Base URL of an OpenAI-compatible server."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; the key itself never enters the spec or cache."""
    temperature: float = Field(default=0.7, ge=0, le=2)
    """Sampling temperature for generation requests (labelling requests use 0)."""
    max_concurrency: int = Field(default=8, ge=1, le=512)
    """Requests in flight at once."""
    max_retries: int = Field(default=5, ge=0, le=20)
    """Retries on 429, 5xx and timeouts, with exponential backoff and jitter."""
    timeout_s: float = Field(default=60, gt=0)
    """Per-request timeout in seconds."""
    budget_usd: float | None = Field(default=None, ge=0)
    """Hard spending cap for this compile; generation stops cleanly when it is reached."""
    max_requests: int | None = Field(default=None, ge=0)
    """Hard cap on paid (uncached) requests for this compile."""
    soft_labels: Literal["logprobs", "samples", "none"] = "logprobs"
    """Where classification soft labels come from: token logprobs, n sampled votes, or none."""
    samples: int = Field(default=5, ge=1, le=50)
    """Votes per example when `soft_labels: samples`."""
    logs: tuple[str, ...] = ()
    """Recorded teacher traffic to replay as data (JSONL chat logs, or CSV/JSONL `{input, label}` rows), relative to the spec."""
    templates: str | None = None
    """Folder of Jinja2 prompt templates overriding the built-in ones, relative to the spec."""


class Data(Section):
    per_intent: int = Field(default=0, ge=0)
    """Teacher-generated prompts per intent (and per refusal) on top of logs; 0 for logs only."""
    registers: tuple[Literal[REGISTERS], ...] = ("formal", "terse", "slang", "typos")  # type: ignore[valid-type]
    """Registers to paraphrase into; `noise` is deterministic augmentation that costs no teacher call."""
    languages: tuple[str, ...] = ("en",)
    """Languages for the `multilingual` register (ISO 639-1 codes)."""
    hard_negatives: int = Field(default=0, ge=0)
    """Hard negatives generated per pair of confusable intents."""
    out_of_scope: int = Field(default=0, ge=0)
    """Out-of-scope prompts to generate (label `out_of_scope`)."""
    noise_copies: int = Field(default=0, ge=0, le=10)
    """Deterministic noisy copies (typos, casing, punctuation) per training example."""
    holdout: float = Field(default=0.15, gt=0, lt=0.5)
    """Fraction held out for validation and again for test (stratified)."""
    seed: int = 0
    """Seed for splits, augmentation and sampling."""
    pii_scrub: bool = True
    """Replace emails, phone numbers, card numbers and IBANs with placeholders."""
    near_duplicate_threshold: float = Field(default=0.9, gt=0, le=1)
    """MinHash Jaccard similarity at or above which two inputs count as duplicates."""


class Lora(Section):
    r: int = Field(default=8, ge=1)
    """LoRA rank."""
    alpha: int = Field(default=16, ge=1)
    """LoRA scaling numerator."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names to adapt."""


class Student(Section):
    base: str = "minilm-l6"
    """`minilm-l6` (offline all-MiniLM-L6-v2), `gemma-3-270m` (offline GGUF extra), a Hugging Face id or a local path; for extract and agent also `scratch:<layers>x<hidden>` (e.g. `scratch:4x256`): a small Llama-style decoder trained from scratch, with a byte-level tokenizer fitted to the training split."""
    method: Literal["kd", "ce", "sft", "gkd"] = "kd"
    """kd: soft-label distillation; ce: hard labels only; sft: supervised traces; gkd: on-policy distillation."""
    teacher_model: str | None = None
    """Local causal LM (id or path) used as the on-policy teacher for `method: gkd`."""
    lora: Lora | None = None
    """Train LoRA adapters (merged before export) instead of all weights."""
    probe: bool = True
    """Classify: fit the head on frozen sentence embeddings before fine-tuning (LP-FT); fine-tuning keeps the probe unless it beats it on validation."""
    epochs: float = Field(default=3, gt=0)
    """Passes over the training split (early stopping may end sooner)."""
    learning_rate: float = Field(default=5e-5, gt=0)
    """Peak learning rate (linear warm-up then decay); a classifier's head gets 10x."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per optimiser step."""
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    """Fraction of steps spent warming up the learning rate."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay."""
    temperature: float = Field(default=2.0, gt=0)
    """KD temperature T."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the KD term; (1 - alpha) goes to cross-entropy on the teacher's labels."""
    max_length: int = Field(default=128, ge=8)
    """Token limit for training inputs."""
    patience: int = Field(default=2, ge=0)
    """Epochs without validation improvement before early stopping (0 disables)."""
    seed: int = 0
    """Training seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses a GPU (bf16) when there is one."""


class Export(Section):
    quantize: Literal["none", "int8", "int4"] = "int8"
    """Weight quantization of the shipped model."""
    max_length: int = Field(default=128, ge=8)
    """Token limit the runtime truncates inputs to."""
    min_parity: float = Field(default=0.99, gt=0, le=1)
    """Minimum agreement between the shipped model and the trained one on validation: argmax (classify), identical greedy outputs (extract, agent)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Extract and agent: the most tokens the runtime generates for one answer."""


class Gates(Section):
    min_teacher_agreement: float | None = Field(default=None, ge=0, le=1)
    """Fail the build when the student agrees with the teacher less often than this on test."""
    max_escalation_rate: float | None = Field(default=None, ge=0, le=1)
    """Fail the build when more than this fraction of test traffic escalates."""
    min_schema_validity: float | None = Field(default=None, ge=0, le=1)
    """Fail the build when fewer student outputs than this validate against the output schema."""


class Spec(Section):
    name: str = Field(pattern=SPEC_NAME_PATTERN)
    """Project name; the default build folder is `build/<name>/`."""
    task: Literal["classify", "extract", "agent"]
    """classify: route to an intent; extract: emit JSON for `output.schema`; agent: multi-turn tool calls."""
    description: str = ""
    """What the student is for; the teacher reads it."""
    input: SchemaBlock = SchemaBlock(schema={
        "type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]})
    """Shape of one request."""
    output: SchemaBlock | None = None
    """Shape of the answer (required for extract)."""
    intents: tuple[Intent, ...] = ()
    """Classes the student routes to (classify), or the request kinds it handles."""
    tools: tuple[Tool, ...] = ()
    """Tools the agent may call (agent)."""
    scenarios: tuple[Scenario, ...] = ()
    """Situations to generate multi-turn agent traces for (agent)."""
    refusals: tuple[Refusal, ...] = ()
    """Requests the student must refuse, each with its fixed response."""
    escalation: Escalation = Escalation()
    """When the student hands a request to the teacher."""
    teacher: Teacher = Teacher()
    """The teacher LLM and its recorded logs."""
    data: Data = Data()
    """How training data is generated, cleaned and split."""
    student: Student = Student()
    """The student model and how it is trained."""
    export: Export = Export()
    """ONNX export and quantization."""
    gates: Gates = Gates()
    """Thresholds that fail the build."""



def class_labels(intents: tuple[Intent, ...], refusals: tuple[Refusal, ...]) -> tuple[str, ...]:
    """Every class a classify student can predict, in spec order: intents, refusals, out_of_scope."""
    return tuple(i.name for i in intents) + tuple(r.name for r in refusals) + (OUT_OF_SCOPE,)


# --------------------------------------------------------------------------- loading

def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> Spec:
    """Read, validate and cross-check a spec file; raise SpecError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [Problem("", f"cannot read spec: {exc.strerror}",
                                            "check the path")]) from None
    return parse_spec(text, str(path), overrides)


def parse_spec(text: str, file: str = "spec.yaml", overrides: dict[str, Any] | None = None) -> Spec:
    located = yamlpos.load(text, file)
    data = located.data
    if not isinstance(data, dict):
        raise SpecError(file, [located.problem((), "the spec must be a mapping of sections",
                                               "start with `name:` and `task:`")])
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(data, dotted_key, value)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(e, located) for e in exc.errors()]
        raise SpecError(file, sorted(problems, key=_reading_order)) from None
    problems = [located.problem(path, msg, hint) for path, msg, hint in check_spec(spec)]
    if problems:
        raise SpecError(file, sorted(problems, key=_reading_order))
    return spec


def _reading_order(problem: Problem) -> tuple[int, int]:
    return (problem.line or 0, problem.col or 0)


def _set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    node = data
    *parents, last = dotted_key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError("--set", [Problem(dotted_key, f"'{part}' is not a section",
                                              "--set only reaches mapping fields")])
    node[last] = value


def _pydantic_problem(err: dict, located: yamlpos.Located) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = tuple("schema" if p == "schema_" else p for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return located.problem(path, "unknown field", _did_you_mean(path), key=True)
    if kind == "missing":
        return located.problem(path, "required field is missing", f"add `{path[-1]}:`", key=True)
    msg = err["msg"]
    if kind == "literal_error":
        hint = None
    elif kind == "string_pattern_mismatch":
        hint = "use lower_snake_case" if err["ctx"]["pattern"] == NAME_PATTERN else None
        msg = f"{err['input']!r} does not match {err['ctx']['pattern']}"
    else:
        hint = None
    msg = msg.replace("valid tuple", "list").replace("valid dictionary", "mapping")
    return located.problem(path, msg[0].lower() + msg[1:], hint)


def _did_you_mean(path: tuple) -> str:
    """Suggest the closest field name of the model that owns `path`."""
    model: Any = Spec
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get("schema_" if part == "schema" else part)
        if field is None:
            return "remove it"
        model = _model_of(field.annotation)
        if model is None:
            return "remove it"
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(path[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid fields: " + ", ".join(names)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found:
            return found
    return None


# --------------------------------------------------------------------------- cross-field rules

Finding = tuple[tuple, str, str | None]  # (path, message, hint)


def check_spec(spec: Spec) -> list[Finding]:
    """Every rule that spans fields; each returns findings instead of raising."""
    return [
        *check_schemas(spec), *check_names(spec), *check_task_needs(spec),
        *check_references(spec), *check_escalation(spec), *check_teacher(spec),
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
    """The runtime constrains extractions and tool arguments to their schemas, so a keyword it
    cannot enforce is an error here rather than an output that silently breaks the schema."""
    from .enforceable import check_schema

    blocks = [(("tools", i, "parameters"), t.parameters) for i, t in enumerate(spec.tools)]
    if spec.task == "extract" and spec.output:
        blocks.append((("output", "schema"), spec.output.schema_))
    found = []
    for path, schema in blocks:
        for problem in check_schema(schema):
            where, _, message = problem.partition(": ")
            sub = () if where == "<root>" else tuple(
                int(p) if p.isdigit() else p for p in where.split("."))
            found.append((path + sub, message, None))  # the message carries its remedy
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


def wants_generation(task: str, data: Data, scenarios: tuple[Scenario, ...]) -> bool:
    """Whether the data section asks a live teacher for anything beyond replaying logs."""
    return bool(data.per_intent or data.hard_negatives or data.out_of_scope or (
        task == "agent" and scenarios))


def check_teacher(spec: Spec) -> list[Finding]:
    t = spec.teacher
    generation = wants_generation(spec.task, spec.data, spec.scenarios)
    if not t.logs and not t.model:
        return [(("teacher",), "no teacher model and no logs", "set teacher.model or teacher.logs")]
    if generation and not t.model:
        return [(("teacher", "model"), "data generation asks for a live teacher",
                 "set teacher.model, or set data.per_intent/hard_negatives/out_of_scope to 0")]
    return []


def _choices(name: str, options: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(options), n=1)
    if close:
        return f"did you mean '{close[0]}'?"
    return "known: " + ", ".join(sorted(options)) if options else "define it first"


# --------------------------------------------------------------------------- docs and schema

def json_schema() -> dict:
    """The spec format as JSON Schema, for `specs/task-spec.schema.json` and editors."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://distill-compiler.dev/task-spec.schema.json"
    schema["title"] = "distill-compiler task spec"
    return schema


def field_docs(model: type[BaseModel] = Spec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, type, doc) for every field, depth first, for `distill show --docs`."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        rows.append((key, _type_name(field.annotation), field.description or ""))
        sub = _model_of(field.annotation)
        if sub is not None and sub is not SchemaBlock:
            rows += field_docs(sub, key + ("[]." if "tuple" in str(field.annotation) else "."))
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("distill_compiler.spec.", "")
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)
