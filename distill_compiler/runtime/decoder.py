"""Greedy generation from an exported causal-LM student: onnxruntime, a KV cache, and masks
that keep structured output valid.

A leaf module (numpy, onnxruntime, tokenizers and the leaves chat_format and constrained), so an
edge bundle runs it without torch or transformers:

    decoder = Decoder("bundle/")                    # model.onnx, decoder.json, tokenizer.json, chat.json
    c = decoder.complete(prompt, Extract(schema))   # JSON valid for the schema, then the END marker
    c = decoder.complete(prompt, Agent(tools))      # free text; every <tool_call> valid for a tool
    c.message, c.confidence, c.truncated

The graph is the single decode graph of `transformers.exporters` (multi-token decode): fed an
empty cache it is the prefill, then it takes one token per step. `decoder.json`, written by the
export stage, names its inputs and outputs and the cache layout.

Modes. Extract constrains the whole answer to the schema from its first token; once the value
is complete the only token left is the END marker. Agent leaves text free; once the text holds
CALL_OPEN, the call is constrained to `call_schema(tools)`, and CALL_CLOSE is forced as soon as
the call's JSON is complete (constrained.tool_call_grammar: one llguidance grammar).
`constrain=False` is plain greedy decoding (for parity with the trained model and the
unconstrained validity metric).

Logprobs are those of the emitted tokens under the masked, renormalised distribution: a forced
token (bytes the grammar fixes, emitted as canonical tokens) scores 0. Confidence is exp of the lowest logprob among tokens picked from a real choice
(more than one token allowed), 1.0 when nothing was chosen.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .chat_format import ChatFormat
from .constrained import JsonConstraint, Vocabulary

DECODER_FORMAT = 1
KV_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class Extract:
    """Answer with one JSON value valid for `schema`."""

    schema: dict


@dataclass(frozen=True)
class Agent:
    """Answer freely or call one of `tools` ({"name", "description", "parameters"}).

    `tool_choice` as in OpenAI's API: "auto" (text or calls), "none" (text only: a token that
    would complete CALL_OPEN is refused), "required" (the answer opens with a call; afterwards
    as auto). A named function is "required" over that one tool."""

    tools: Sequence[dict]
    tool_choice: str = "auto"


@dataclass
class Completion:
    text: str                 # the answer, without the END marker
    message: dict             # chat.parse(text): content and tool_calls
    token_ids: list[int]      # emitted tokens, the END marker included when it came
    logprobs: list[float]     # per emitted token, under the (masked) distribution it came from
    confidence: float
    new_tokens: int
    seconds: float
    truncated: bool = False   # max_new_tokens (or the context) ran out before the END marker
    first_token_seconds: float = 0.0  # prompt in, first token chosen (time to first token)
    cached_prefix: int = 0    # prompt tokens whose KV cache came from warm() instead of a prefill

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class DecoderSpec:
    """decoder.json: how to drive the exported graph."""

    input_ids: str
    position_ids: str | None
    attention_mask: str | None
    logits: str
    past_inputs: list[str]    # cache inputs, in graph order
    past_outputs: list[str]   # the matching cache outputs, same order
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    vocab_size: int           # the logits' width (may exceed the tokenizer's vocabulary)
    context_length: int
    stop_token_ids: list[int]
    format: int = DECODER_FORMAT
    add_special_tokens: bool = False  # prompts are rendered chat text; markers are in the text

    @classmethod
    def load(cls, path: Path) -> DecoderSpec:
        data = json.loads(Path(path).read_text())
        if data.get("format") != DECODER_FORMAT:
            raise ValueError(f"{path}: decoder format {data.get('format')!r} is not "
                             f"{DECODER_FORMAT}; re-export the model with this version")
        return cls(**data)

    def to_dict(self) -> dict:
        return dict(vars(self))


class Graph:
    """One onnxruntime session over the decode graph, with its cache."""

    def __init__(self, path: Path, spec: DecoderSpec, threads: int | None = None,
                 providers: Sequence[str] | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.spec = spec
        self.outputs = [spec.logits, *spec.past_outputs]

    def empty_cache(self) -> list[np.ndarray]:
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return [np.zeros(shape, KV_DTYPES[self.spec.kv_dtype]) for _ in self.spec.past_inputs]

    def step(self, ids: Sequence[int], start: int, cache: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the last of `ids` (placed at positions start...), and the grown cache."""
        spec = self.spec
        feed_ = {spec.input_ids: np.array([ids], dtype=np.int64),
                 **dict(zip(spec.past_inputs, cache))}
        if spec.position_ids:
            feed_[spec.position_ids] = np.arange(start, start + len(ids), dtype=np.int64)[None]
        if spec.attention_mask:
            feed_[spec.attention_mask] = np.ones((1, start + len(ids)), dtype=np.int64)
        logits, *cache = self.session.run(self.outputs, feed_)
        return logits[0, -1].astype(np.float32), cache


# --------------------------------------------------------------------------- guides


class Guide:
    """Which tokens may come next. `mask()` is None when every token may; `forced()` is a token
    the output must take now (no model choice)."""

    def mask(self) -> np.ndarray | None:
        return None

    def forced(self) -> int | None:
        return None

    def advance(self, token: int) -> None:
        pass

    def reject(self, token: int) -> bool:
        """Whether `token`, picked from mask(), must be refused after all (checked lazily)."""
        return False


# --------------------------------------------------------------------------- the decoder


class Decoder:
    """Greedy decoding of an exported student (a bundle or the export artifact directory)."""

    def __init__(self, directory: str | Path, threads: int | None = None,
                 providers: Sequence[str] | None = None, model: str = "model.onnx"):
        directory = Path(directory)
        spec = DecoderSpec.load(directory / "decoder.json")
        self._bind(Graph(directory / model, spec, threads, providers), spec,
                   Tokenizer.from_file(str(directory / "tokenizer.json")),
                   ChatFormat.from_dict(json.loads((directory / "chat.json").read_text())))

    @classmethod
    def over(cls, graph, spec: DecoderSpec, tokenizer: Tokenizer, chat: ChatFormat) -> Decoder:
        """A decoder over any graph with `empty_cache()` and `step()` (Graph's interface): the
        compiler decodes the model it is training this way, with the runtime's own masks."""
        decoder = cls.__new__(cls)
        decoder._bind(graph, spec, tokenizer, chat)
        return decoder

    def _bind(self, graph, spec: DecoderSpec, tokenizer: Tokenizer, chat: ChatFormat) -> None:
        self.graph, self.spec, self.tokenizer, self.chat = graph, spec, tokenizer, chat
        self.end_id = self.spec.stop_token_ids[0]
        self._prefixes: list[tuple[list[int], list[np.ndarray]]] = []
        self._vocab: Vocabulary | None = None
        self._max_token_chars: int | None = None
        self._constraints: dict[str, JsonConstraint] = {}

    # -- what constrained decoding needs, built once: classifying the vocabulary is the cost

    @property
    def vocab(self) -> Vocabulary:
        if self._vocab is None:
            # llguidance encodes forced bytes with it: a copy without padding or truncation
            tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._vocab = Vocabulary(tokenizer.to_str(), self.spec.vocab_size,
                                     self.spec.stop_token_ids)
        return self._vocab

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: its vocabulary's longest entry."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        return self._max_token_chars

    def constraint(self, schema: dict) -> JsonConstraint:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._constraints:
            self._constraints[key] = JsonConstraint.for_schema(schema, self.vocab)
        return self._constraints[key]

    def tool_constraint(self, tools: Sequence[dict], tool_choice: str) -> JsonConstraint:
        key = json.dumps([list(tools), tool_choice], sort_keys=True)
        if key not in self._constraints:
            self._constraints[key] = JsonConstraint.for_tools(tools, tool_choice, self.vocab)
        return self._constraints[key]

    def guide(self, mode: Extract | Agent | None) -> Guide:
        if isinstance(mode, Extract):
            return self.constraint(mode.schema).start()
        if isinstance(mode, Agent):
            return self.tool_constraint(list(mode.tools), mode.tool_choice).start()
        return Guide()

    # -- decoding

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=self.spec.add_special_tokens).ids

    def warm(self, prefix: str) -> int:
        """Compute the KV cache of a prompt start that many requests share (a bundle's system
        turn: its description and tool signatures) once; a prompt that begins with its tokens
        then prefills only the rest. Returns the prefix's length in tokens.

        Only for graphs whose caches are values (onnxruntime returns new arrays each step);
        a prompt whose tokens do not start with the prefix's (a different tokenization at the
        seam) is prefilled whole, so answers never change."""
        ids = self.encode(prefix)
        if ids:
            _, cache = self.graph.step(ids, 0, self.graph.empty_cache())
            self._prefixes.append((ids, cache))
        return len(ids)

    def _prefill(self, prompt_ids: list[int]) -> tuple[np.ndarray, list, int]:
        """Logits after the prompt, its cache, and how many of its tokens came cached."""
        for ids, cache in self._prefixes:
            n = len(ids)
            if n < len(prompt_ids) and prompt_ids[:n] == ids:
                return (*self.graph.step(prompt_ids[n:], n, cache), n)
        return (*self.graph.step(prompt_ids, 0, self.graph.empty_cache()), 0)

    def complete(self, prompt: str, mode: Extract | Agent | None = None,
                 max_new_tokens: int = 256, constrain: bool = True) -> Completion:
        """Continue `prompt` (rendered chat text ending in the generation prompt)."""
        return self.generate(self.encode(prompt), mode, max_new_tokens, constrain)

    def generate(self, prompt_ids: Sequence[int], mode: Extract | Agent | None = None,
                 max_new_tokens: int = 256, constrain: bool = True) -> Completion:
        started = time.perf_counter()
        prompt_ids = list(prompt_ids)
        room = self.spec.context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model reads at most "
                             f"{self.spec.context_length}")
        guide = self.guide(mode) if constrain else Guide()
        logits, cache, cached = self._prefill(prompt_ids)
        tokens, logprobs, choices, first = [], [], [], 0.0
        while len(tokens) < min(max_new_tokens, room):
            token, logprob, choice = pick(logits, guide)
            first = first or time.perf_counter() - started
            tokens.append(token)
            logprobs.append(logprob)
            if choice:
                choices.append(logprob)
            guide.advance(token)
            if token in self.spec.stop_token_ids:
                break
            logits, cache = self.graph.step([token], len(prompt_ids) + len(tokens) - 1, cache)
        finished = bool(tokens) and tokens[-1] in self.spec.stop_token_ids
        body = tokens[:-1] if finished else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return Completion(
            text=text, message=self.chat.parse(text), token_ids=tokens, logprobs=logprobs,
            confidence=float(np.exp(min(choices))) if choices else 1.0, new_tokens=len(tokens),
            seconds=time.perf_counter() - started, truncated=not finished,
            first_token_seconds=first, cached_prefix=cached)


def pick(logits: np.ndarray, guide: Guide) -> tuple[int, float, bool]:
    """The greedy token, its logprob under the guide's renormalised mask, and whether it was a
    choice (more than one token allowed)."""
    forced = guide.forced()
    if forced is not None:
        return forced, 0.0, False
    scores = logits.astype(np.float64)
    mask = guide.mask()
    if mask is not None:
        scores = np.where(mask[:len(scores)], scores, -np.inf)
    while True:
        token = int(np.argmax(scores))
        if not guide.reject(token):
            break
        scores[token] = -np.inf
    finite = scores[np.isfinite(scores)]
    top = finite.max()
    logprob = float(scores[token] - top - np.log(np.exp(finite - top).sum()))
    return token, logprob, finite.size > 1
