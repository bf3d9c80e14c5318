"""Greedy generation from an exported causal-LM student: onnxruntime, a KV cache, and masks
that keep structured output valid.

A leaf module (numpy, onnxruntime, tokenizers and the leaves chat_format and constrained), so an
edge bundle runs it without torch or transformers:

    decoder = Decoder("bundle/")                    # model.onnx, decoder.json, tokenizer.json, chat.json
    c = decoder.complete(prompt, Extract(schema))   # JSON valid for the schema, then the END marker
    c = decoder.complete(prompt, Agent(tools))      # free text; every <tool_call> valid for a tool
    c.message, c.confidence, c.truncated
    decoder.generate_many(prompt_ids, modes)        # the same answers, rows decoded together

Batching (Batch): rows with their own caches, left-padded to the longest and masked, share one
graph run per step; each keeps its positions and its Guide, and rows join and leave between
steps. It needs a graph with position_ids and attention_mask inputs (`graph_batches`).

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
from dataclasses import dataclass, field
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
    prompt_tokens: int = 0

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

    def step_rows(self, tokens: Sequence[int], positions: Sequence[int], cache: list[np.ndarray],
                  pad: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One token per row at its own position, over a cache whose rows start with `pad`
        masked positions (Batch); the logits (rows, vocab) and the grown cache."""
        spec, rows = self.spec, len(tokens)
        feed_ = {spec.input_ids: np.array(tokens, dtype=np.int64)[:, None],
                 **dict(zip(spec.past_inputs, cache))}
        if spec.position_ids:
            feed_[spec.position_ids] = np.array(positions, dtype=np.int64)[:, None]
        if spec.attention_mask:
            length = cache[0].shape[2] + 1
            mask = np.ones((rows, length), dtype=np.int64)
            for i, p in enumerate(pad):
                mask[i, :p] = 0
            feed_[spec.attention_mask] = mask
        logits, *cache = self.session.run(self.outputs, feed_)
        return logits[:, -1].astype(np.float32), cache


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

    @property
    def graph_batches(self) -> bool:
        """Whether rows can share a step (Batch): the graph takes positions and a mask, so
        padding neither shifts a row's positions nor is attended to, and has step_rows."""
        return bool(self.spec.position_ids and self.spec.attention_mask
                    and hasattr(self.graph, "step_rows"))

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
        row = self.begin(prompt_ids, mode, max_new_tokens, constrain)
        while not self.advance(row):
            row.logits, row.cache = self.graph.step([row.tokens[-1]], row.position, row.cache)
        return self.finish(row)

    def generate_many(self, prompts: Sequence[Sequence[int]], modes: Sequence[Extract | Agent | None],
                      max_new_tokens: int = 256, rows: int = 8) -> list[Completion]:
        """generate() for each prompt, up to `rows` of them decoded together (Batch): the
        same answers, in order, for one pass over the weights per step instead of one per
        request. A row that finishes leaves and the next prompt joins between steps."""
        rows = rows if self.graph_batches else 1
        pending = list(zip(range(len(prompts)), prompts, modes))[::-1]
        done: dict[int, Completion] = {}
        batch, index = Batch(self), {}
        while pending or batch.rows:
            while pending and len(batch.rows) < rows:
                i, ids, mode = pending.pop()
                row = self.begin(ids, mode, max_new_tokens)
                if self.advance(row):
                    done[i] = self.finish(row)
                else:
                    index[id(row)] = i
                    batch.join(row)
            if batch.rows:
                for row in batch.step():
                    done[index.pop(id(row))] = self.finish(row)
        return [done[i] for i in range(len(prompts))]

    # -- one request's decoding, in three parts so a Batch can interleave many of them

    def begin(self, prompt_ids: Sequence[int], mode: Extract | Agent | None = None,
              max_new_tokens: int = 256, constrain: bool = True) -> Row:
        """A request after its prefill: the logits of its first token are ready to pick."""
        started = time.perf_counter()
        prompt_ids = list(prompt_ids)
        room = self.spec.context_length - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model reads at most "
                             f"{self.spec.context_length}")
        guide = self.guide(mode) if constrain else Guide()
        logits, cache, cached = self._prefill(prompt_ids)
        return Row(prompt_ids, guide, min(max_new_tokens, room), started, cached, logits, cache)

    def advance(self, row: Row) -> bool:
        """Pick the row's next token from its logits; whether the row is finished (the END
        marker came, or its token limit)."""
        token, logprob, choice = pick(row.logits, row.guide)
        row.first = row.first or time.perf_counter() - row.started
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if choice:
            row.choices.append(logprob)
        row.guide.advance(token)
        return token in self.spec.stop_token_ids or len(row.tokens) >= row.limit

    def finish(self, row: Row) -> Completion:
        tokens = row.tokens
        finished = bool(tokens) and tokens[-1] in self.spec.stop_token_ids
        body = tokens[:-1] if finished else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return Completion(
            text=text, message=self.chat.parse(text), token_ids=tokens, logprobs=row.logprobs,
            confidence=float(np.exp(min(row.choices))) if row.choices else 1.0,
            new_tokens=len(tokens), seconds=time.perf_counter() - row.started,
            truncated=not finished, first_token_seconds=row.first, cached_prefix=row.cached,
            prompt_tokens=len(row.prompt_ids))


@dataclass(eq=False)
class Row:
    """One request being decoded: its guide, what it has emitted, and (while it decodes
    alone) its own cache. Identity, not value, tells rows apart."""

    prompt_ids: list[int]
    guide: Guide
    limit: int                # new tokens it may emit
    started: float
    cached: int               # prompt tokens that came from a warmed prefix
    logits: np.ndarray | None  # of the next token, once a step computed them
    cache: list[np.ndarray] | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    choices: list[float] = field(default_factory=list)
    first: float = 0.0

    @property
    def position(self) -> int:
        """Where the last emitted token goes: it is fed to the graph there."""
        return len(self.prompt_ids) + len(self.tokens) - 1


class Batch:
    """Rows decoded together: one graph run per step feeds every row its last token.

    On a CPU a decode step of a small model is bound by reading its weights, which a run of
    B rows reads once; so B rows cost far less than B runs. Rows have caches of different
    lengths: they are left-padded to the longest, and the attention mask hides the padding,
    while each row keeps its own positions, so a row's logits are those it gets alone (up to
    float rounding). Padding is paid for when a row joins or leaves, never per step.
    """

    def __init__(self, decoder: Decoder):
        self.decoder, self.graph = decoder, decoder.graph
        self.rows: list[Row] = []
        self.pad: list[int] = []          # padding at the start of each row's cache
        self.cache: list[np.ndarray] = []  # (rows, heads, length, head_dim) per graph input

    @property
    def length(self) -> int:
        return self.cache[0].shape[2] if self.cache else 0

    def join(self, row: Row) -> None:
        """Add a row that has just picked a token (Decoder.begin, then advance)."""
        own, length = row.cache, row.cache[0].shape[2]
        row.cache = None  # the batch holds it from now on
        if not self.rows:
            self.rows, self.pad, self.cache = [row], [0], own
            return
        grow = max(0, length - self.length)
        if grow:
            self.cache = [_left_pad(c, grow) for c in self.cache]
            self.pad = [p + grow for p in self.pad]
        extra = self.length - length
        self.cache = [np.concatenate([c, _left_pad(o, extra)]) for c, o in zip(self.cache, own)]
        self.rows.append(row)
        self.pad.append(extra)

    def step(self) -> list[Row]:
        """Feed each row its last token and pick the next; the rows that finished, which
        leave the batch."""
        logits, self.cache = self.graph.step_rows(
            [r.tokens[-1] for r in self.rows], [r.position for r in self.rows], self.cache,
            self.pad)
        finished = []
        for row, row_logits in zip(self.rows, logits):
            row.logits = row_logits
            if self.decoder.advance(row):
                finished.append(row)
        if finished:
            self._leave(finished)
        return finished

    def _leave(self, gone: list[Row]) -> None:
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.pad, self.cache = [], []
            return
        # Drop the padding no remaining row needs (the longest row that left set it).
        trim = min(self.pad[i] for i in keep)
        self.pad = [self.pad[i] - trim for i in keep]
        self.cache = [c[keep, :, trim:] for c in self.cache]


def _left_pad(cache: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return cache
    return np.pad(cache, ((0, 0), (0, 0), (n, 0), (0, 0)))


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
