"""Schema-constrained decoding through llguidance: a token mask that keeps a decoder's output
valid for a JSON Schema (extract) or for the offered tools (agent).

A leaf module (numpy, llguidance and the leaves chat_format and enforceable), so the edge
runtime imports it next to onnxruntime:

    vocab = Vocabulary(tokenizer.to_str(), logit_width, stop_ids)   # once per decoder
    guide = JsonConstraint.for_schema(schema, vocab).start()          # or .for_tools(tools, choice)
    while True:
        token = guide.forced()                  # bytes the grammar fixes, as canonical tokens
        if token is None:
            logits[~guide.mask()] = -np.inf     # an END marker only once the value is complete
            token = pick(logits)
        guide.advance(token)

llguidance (Rust) compiles the grammar once, reads the vocabulary from the bundle's
tokenizer.json (byte-level BPE and SentencePiece byte fallback alike; no transformers), and
computes each mask from its own token trie; tokens that span structure (`", "`, `"}}</`) are
allowed exactly when all their bytes fit. What it enforces is enforceable.decoding_schema's:
every keyword it compiles (pattern, format, bounds, $ref, ...), object properties in schema
order, declared properties only unless the schema allows others, and json.dumps's layout with
separators `", "` and `": "`, as chat_format renders the training targets.

Bytes the grammar forces (a key after `{"`, the only tool's name, the rest of CALL_CLOSE) are
emitted as the tokenizer's canonical tokens, without consulting the model: what the student was
trained on, and no choice that could lower its confidence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import llguidance
import llguidance.numpy as llnp
import numpy as np

from .chat_format import CALL_CLOSE, CALL_OPEN, call_schema
from .enforceable import SchemaNotEnforceable, check_schema, decoding_schema

TOOL_CHOICES = ("auto", "none", "required")


class Vocabulary:
    """The decoder's tokens as llguidance reads them. Build one per tokenizer (it walks the
    whole vocabulary) and share it between constraints.

    `size` is the logits' width, which may exceed the tokenizer's vocabulary (padded
    embeddings); `stop_ids` are the END markers, allowed once the output is complete."""

    def __init__(self, tokenizer_json: str, size: int, stop_ids: Sequence[int]):
        self.size = size
        self.stop_ids = list(stop_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=size,
                                                eos_token=self.stop_ids)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])


class JsonConstraint:
    """A grammar compiled for one vocabulary: a JSON value for a schema, or an agent's answer
    (free text and tool calls). Build once per schema or tool set; start() per request."""

    def __init__(self, grammar: str, vocab: Vocabulary):
        self.grammar, self.vocab = grammar, vocab
        self._matcher = llguidance.LLMatcher(vocab.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise SchemaNotEnforceable([self._matcher.get_error()])

    @classmethod
    def for_schema(cls, schema: dict, vocab: Vocabulary) -> JsonConstraint:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(decoding_schema(schema))
        try:
            return cls(grammar, vocab)
        except SchemaNotEnforceable as error:  # say where, as `distill check` does
            raise SchemaNotEnforceable(check_schema(schema) or error.problems) from None

    @classmethod
    def for_tools(cls, tools: Sequence[dict], tool_choice: str, vocab: Vocabulary
                  ) -> JsonConstraint:
        grammar = llguidance.LLMatcher.grammar_from_lark(tool_call_grammar(tools, tool_choice))
        try:
            return cls(grammar, vocab)
        except SchemaNotEnforceable as error:
            where = [f"{t['name']}.{p}" for t in tools for p in check_schema(t["parameters"])]
            raise SchemaNotEnforceable(where or error.problems) from None

    def start(self) -> GrammarGuide:
        # A copy of the compiled matcher skips parsing the grammar again for every request.
        return GrammarGuide(self._matcher.deep_copy(), self.vocab.size)


class GrammarGuide:
    """One request's place in the grammar, behind the decoder's Guide interface."""

    def __init__(self, matcher, size: int):
        self.matcher, self.size = matcher, size
        self._bitmask = llnp.allocate_token_bitmask(1, size)

    def forced(self) -> int | None:
        forced = self.matcher.compute_ff_tokens()
        return forced[0] if forced else None

    def mask(self) -> np.ndarray:
        """Boolean mask over the logits of the tokens that may come next."""
        llnp.fill_next_token_bitmask(self.matcher, self._bitmask)
        bits = np.unpackbits(self._bitmask[0].view(np.uint8), bitorder="little")
        return bits[:self.size].view(bool)

    def reject(self, token: int) -> bool:
        return False  # the mask is exact

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} cannot continue the output here: "
                             f"{self.matcher.get_error()}")

    @property
    def accepting(self) -> bool:
        """Whether the output so far is complete, so an END marker may follow."""
        return self.matcher.is_accepting()


def tool_call_grammar(tools: Sequence[dict], tool_choice: str = "auto") -> str:
    """The Lark grammar of an agent's answer: free text, in which CALL_OPEN starts a call whose
    JSON follows call_schema(tools) and ends with CALL_CLOSE, then free text again.

    tool_choice as in OpenAI's API: "auto" (text or calls), "none" (text that never spells
    CALL_OPEN), "required" (the answer opens with a call; afterwards as auto)."""
    if tool_choice not in TOOL_CHOICES:
        raise ValueError(f"tool_choice {tool_choice!r} is not one of {TOOL_CHOICES}")
    if tool_choice == "none":
        # Negation may match invalid UTF-8; the intersection keeps the text well-formed.
        return (f"start: FREE\nFREE: /(?s:.*)/ & ~/(?s:.*){re.escape(CALL_OPEN)}(?s:.*)/\n")
    first = f"{json.dumps(CALL_OPEN)} call_json {json.dumps(CALL_CLOSE)} " \
        if tool_choice == "required" else ""
    # `head` is lazy: it ends at the first CALL_OPEN, so no call hides inside free text.
    return (f"start: {first}call* TEXT\n"
            f"call: head call_json {json.dumps(CALL_CLOSE)}\n"
            f"head[lazy]: TEXT {json.dumps(CALL_OPEN)}\n"
            f"TEXT: /(?s:.*)/\n"
            f"call_json: %json {json.dumps(decoding_schema(call_schema(list(tools))))}\n")
