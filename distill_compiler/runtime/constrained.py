"""Schema-constrained JSON decoding: a token mask that keeps a decoder's output valid for a schema.

A leaf module (standard library and numpy only), so the edge runtime can import it next to
onnxruntime. Two entry points:

    problems = check_schema(schema)        # [] or ["properties.date.format: 'format' cannot ..."]
    c = JsonConstraint(schema, byte_level_vocab(tok.get_vocab(), specials), eos_id)
    state = c.start()
    while not state.finished:
        logits[~c.allowed(state)] = -np.inf        # EOS is allowed only once the value is complete
        state = c.advance(state, pick(logits))

Every sequence the mask lets through is a JSON document that validates against the schema.

How it works. The schema is compiled once into a small grammar of nodes (object, array, string,
number, literal, choice). Decoding state is a set of immutable stacks of frames, one frame per
open value, and `step_stack` moves a stack over one byte; the set only has more than one stack
where `anyOf` (or a numeric enum like [1, 10]) leaves the parse ambiguous. Tokens are byte
strings and may span structure (`", "`, `"}`, `": {"`), so a token is allowed iff all of its
bytes can be consumed in turn.

Testing every token per step would be far too slow for a 32k vocabulary, so masks are built the
way grammar engines such as xgrammar do: the tokens' fate is worked out per *top frame* only, by
walking a trie of the vocabulary once (cached per frame), and split into tokens that stay inside
the top value, and tokens that finish it and leave a suffix for the enclosing value. Only those
suffixes (few and short: `,`, `}`, `", "`) are checked against the rest of the stack. Inside a
string, the frame would change with every character (the length counts towards maxLength), so
string bodies share one length-free classification per vocabulary that records how many
characters each token adds; maxLength/minLength are then a vectorised comparison.

What the decoder emits, so that training data can be serialised the same way:
- The layout of `json.dumps(value, ensure_ascii=False)`: no whitespace except the separators,
  which default to json.dumps's `", "` and `": "` (pass `separators=(",", ":")` for compact).
- Object properties in the schema's `properties` order. Required ones always appear; optional
  ones may be skipped. Only declared properties are emitted, whatever additionalProperties says,
  so the output validates with or without `additionalProperties: false`.
- String contents are free: any character except raw control characters, the JSON escapes
  included (\\uXXXX outside the surrogate range: characters beyond U+FFFF come as UTF-8), and
  only well-formed UTF-8 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .enforceable import SchemaNotEnforceable, check_schema

# --------------------------------------------------------------------------- grammar
#
# A frame is a hashable tuple whose first item is its node: (node, *position). Frames are
# immutable, so a stack (a tuple of frames) can key caches and be shared between states.
# `node.step(frame, byte)` returns the outcomes of reading one byte; several mean ambiguity.

STAY = 0       # consumed; the value goes on, in the given frame
DONE = 1       # consumed; the value is complete (a closing quote, brace, last literal byte)
PUSH = 2       # consumed; the frame goes on and a child value starts after this byte
PUSH_FEED = 3  # not consumed; a child value starts with this byte (an array's first item)
END_FEED = 4   # not consumed; the value ended just before this byte (a number before ',')

_NONE: list = []


class Node:
    """One value of the compiled schema."""

    def starts(self) -> list[tuple]:
        """The frames a value of this node starts in (several for a choice)."""
        return [self.start]

    def can_end(self, frame: tuple) -> bool:
        """Whether the value may end here without reading a delimiter (a top-level number)."""
        return False


class LiteralNode(Node):
    """A fixed set of JSON texts: enum, const, booleans and null."""

    def __init__(self, literals: Iterable[bytes]):
        self.literals = frozenset(literals)
        self.prefixes = {lit[:i] for lit in self.literals for i in range(1, len(lit))}
        self.start = (self, b"")

    def step(self, frame, b):
        text = frame[1] + bytes((b,))
        out = []
        if text in self.literals:
            out.append((DONE, None, None))
        if text in self.prefixes:  # both only for numbers: enum [1, 10] after "1"
            out.append((STAY, (self, text), None))
        return out


@dataclass(frozen=True)
class _Connector:
    """The texts allowed between an object's members: each ends in a property key or the brace."""

    complete: dict  # full text -> index of the property it opens, or CLOSE
    prefixes: frozenset


CLOSE = -1


class ObjectNode(Node):
    """Properties in schema order; required ones always, optional ones may be skipped.

    A frame is (node, pos, consumed): pos -1 before '{', otherwise one past the last property
    written. `consumed` is the part of the connector read so far, where a connector is the text
    up to the next value, e.g. `{"name": ` or `, "date": `, or the closing `}`.
    """

    def __init__(self, props: list[tuple[str, Node, bool]], separators: tuple[str, str]):
        self.children = [node for _, node, _ in props]
        item_sep, key_sep = (s.encode() for s in separators)
        keys = [json.dumps(name, ensure_ascii=False).encode() + key_sep for name, _, _ in props]
        required = [req for _, _, req in props]
        self.connectors = {}
        for pos in [-1, *range(1, len(props) + 1)]:
            first = max(pos, 0)
            lead, close = (b"{", b"{}") if pos == -1 else (item_sep, b"}")
            complete = {}
            for j in range(first, len(props)):
                complete[lead + keys[j]] = j
                if required[j]:  # cannot skip past a required property
                    break
            else:
                complete[close] = CLOSE
            prefixes = frozenset(t[:i] for t in complete for i in range(1, len(t)))
            self.connectors[pos] = _Connector(complete, prefixes)
        self.start = (self, -1, b"")

    def step(self, frame, b):
        _, pos, consumed = frame
        text = consumed + bytes((b,))
        connector = self.connectors[pos]
        target = connector.complete.get(text)
        if target == CLOSE:
            return [(DONE, None, None)]
        if target is not None:
            return [(PUSH, (self, target + 1, b""), self.children[target])]
        if text in connector.prefixes:
            return [(STAY, (self, pos, text), None)]
        return _NONE


_OPEN, _FIRST, _AFTER = "open", "first", "after"


class ArrayNode(Node):
    """`[` items separated by the item separator `]`, with minItems/maxItems.

    A frame is (node, phase, count, consumed). The count is clipped where it stops mattering,
    so an unbounded array does not make a new frame (and a new cache entry) per item.
    """

    def __init__(self, item: Node, min_items: int, max_items: int | None, separator: str):
        self.item, self.min, self.max = item, min_items, max_items
        self.sep = separator.encode()
        self.cap = max_items if max_items is not None else min_items
        self.start = (self, _OPEN, 0, b"")

    def step(self, frame, b):
        _, phase, count, consumed = frame
        if phase == _OPEN:
            return [(STAY, (self, _FIRST, 0, b""), None)] if b == 0x5B else _NONE  # [
        if b == 0x5D and not consumed:  # ]
            return [(DONE, None, None)] if count >= self.min else _NONE
        if self.max is not None and count >= self.max:
            return _NONE
        after = (self, _AFTER, min(count + 1, self.cap), b"")
        if phase == _FIRST:
            return [(PUSH_FEED, after, self.item)]
        text = consumed + bytes((b,))
        if text == self.sep:
            return [(PUSH, after, self.item)]
        if self.sep.startswith(text):
            return [(STAY, (self, _AFTER, count, text), None)]
        return _NONE


# String phases: before the opening quote, in the body, after a backslash, inside \uXXXX
# (hex digits read, whether the first was d/D), inside a UTF-8 character (bytes left, range
# of the next one). The last two keep the output free of lone surrogates and malformed UTF-8.
_START, _BODY, _ESC = "start", "body", "esc"
_SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CONT = (0x80, 0xBF)


def _utf8_lead(b: int) -> tuple | None:
    """The phase after a UTF-8 lead byte, ("utf8", bytes left, next byte's range); None if
    the byte cannot start a character. The ranges exclude overlong forms and surrogates."""
    if 0xC2 <= b <= 0xDF:
        return ("utf8", 1, *_CONT)
    if 0xE0 <= b <= 0xEF:
        return ("utf8", 2, *{0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F)}.get(b, _CONT))
    if 0xF0 <= b <= 0xF4:
        return ("utf8", 3, *{0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(b, _CONT))
    return None


class StringNode(Node):
    """A JSON string with minLength/maxLength counted in characters (an escape is one).

    A frame is (node, phase, length). A character is counted at its first byte, so that
    maxLength can refuse it before it starts; the closing quote is always allowed once
    minLength is met, so a full string never dead-ends.
    """

    def __init__(self, min_length: int = 0, max_length: int | None = None):
        self.min, self.max = min_length, max_length
        self.start = (self, _START, 0)

    def step(self, frame, b):
        _, phase, length = frame
        if phase == _BODY:
            if b == 0x22:  # "
                return [(DONE, None, None)] if length >= self.min else _NONE
            if b < 0x20 or (self.max is not None and length >= self.max):
                return _NONE
            if b == 0x5C:  # \
                nxt = _ESC
            elif b < 0x80:
                nxt = _BODY
            else:
                nxt = _utf8_lead(b)
                if nxt is None:
                    return _NONE
            return [(STAY, (self, nxt, length + 1), None)]
        if phase == _START:
            return [(STAY, (self, _BODY, 0), None)] if b == 0x22 else _NONE
        if phase == _ESC:
            if b in _SIMPLE_ESCAPES:
                return [(STAY, (self, _BODY, length), None)]
            return [(STAY, (self, ("u", 0, False), length), None)] if b == 0x75 else _NONE  # u
        if phase[0] == "u":
            _, read, high = phase
            if b not in _HEX or (read == 1 and high and b not in b"01234567"):  # D800-DFFF
                return _NONE
            nxt = _BODY if read == 3 else ("u", read + 1, high or (read == 0 and b in b"dD"))
            return [(STAY, (self, nxt, length), None)]
        _, left, lo, hi = phase  # inside a UTF-8 character
        if not lo <= b <= hi:
            return _NONE
        nxt = _BODY if left == 1 else ("utf8", left - 1, *_CONT)
        return [(STAY, (self, nxt, length), None)]


# Number phases (JSON grammar), the ones a number may end in, and their transitions.
_NUMBER_ACCEPTS = frozenset({"zero", "int", "frac", "exp_digits"})
_DIGITS = frozenset(b"0123456789")


class NumberNode(Node):
    """A JSON number; `integer` forbids the fraction and the exponent.

    A number has no closing character: it ends when the next byte cannot continue it
    (END_FEED hands that byte to the enclosing value), or at EOS at the top level.
    """

    def __init__(self, integer: bool):
        self.integer = integer
        self.start = (self, "start")

    def _next(self, phase: str, b: int) -> str | None:
        digit = b in _DIGITS
        if phase in ("start", "minus"):
            if b == 0x2D and phase == "start":  # -
                return "minus"
            return "zero" if b == 0x30 else "int" if digit else None
        if phase == "int" and digit:
            return "int"
        if phase in ("zero", "int") and not self.integer:
            return "dot" if b == 0x2E else "exp" if b in b"eE" else None
        if phase in ("dot", "frac") and digit:
            return "frac"
        if phase == "frac" and b in b"eE":
            return "exp"
        if phase == "exp" and b in b"+-":
            return "exp_sign"
        if phase in ("exp", "exp_sign", "exp_digits") and digit:
            return "exp_digits"
        return None

    def step(self, frame, b):
        nxt = self._next(frame[1], b)
        if nxt is not None:
            return [(STAY, (self, nxt), None)]
        return [(END_FEED, None, None)] if frame[1] in _NUMBER_ACCEPTS else _NONE

    def can_end(self, frame):
        return frame[1] in _NUMBER_ACCEPTS


class ChoiceNode(Node):
    """anyOf, or a list of types: the value starts in every branch at once."""

    def __init__(self, branches: list[Node]):
        self.branches = branches

    def starts(self):
        return [frame for branch in self.branches for frame in branch.starts()]


def compile_schema(schema: dict, separators: tuple[str, str] = (", ", ": ")) -> Node:
    """The grammar for a schema that check_schema accepts."""
    if "anyOf" in schema:
        return ChoiceNode([compile_schema(s, separators) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return LiteralNode(json.dumps(v, ensure_ascii=False, separators=separators).encode()
                           for v in values)
    types = schema["type"]
    types = [types] if isinstance(types, str) else types
    nodes = [_compile_type(schema, t, separators) for t in types]
    return nodes[0] if len(nodes) == 1 else ChoiceNode(nodes)


def _compile_type(schema: dict, t: str, separators: tuple[str, str]) -> Node:
    if t == "object":
        required = set(schema.get("required", ()))
        return ObjectNode([(name, compile_schema(sub, separators), name in required)
                           for name, sub in schema.get("properties", {}).items()], separators)
    if t == "array":
        return ArrayNode(compile_schema(schema["items"], separators), schema.get("minItems", 0),
                         schema.get("maxItems"), separators[0])
    if t == "string":
        return StringNode(schema.get("minLength", 0), schema.get("maxLength"))
    if t in ("integer", "number"):
        return NumberNode(integer=t == "integer")
    return LiteralNode([b"true", b"false"] if t == "boolean" else [b"null"])


# --------------------------------------------------------------------------- stacks

LEFTOVER = ("leftover",)  # the bottom frame ended before a byte it could not read


def step_stack(stack: tuple, b: int) -> list:
    """The stacks after reading byte `b`. () means the bottom value completed on `b`;
    LEFTOVER means it completed just before `b`, which nothing below it can read."""
    top, below = stack[-1], stack[:-1]
    out = []
    for kind, frame, child in top[0].step(top, b):
        if kind == STAY:
            out.append(below + (frame,))
        elif kind == DONE:
            out.append(below)
        elif kind == PUSH:
            out.extend(below + (frame, start) for start in child.starts())
        elif kind == PUSH_FEED:
            for start in child.starts():
                out.extend(step_stack(below + (frame, start), b))
        else:  # END_FEED
            out.extend(step_stack(below, b) if below else [LEFTOVER])
    return out


def feed(stacks: Iterable[tuple], data: bytes) -> frozenset:
    """The stacks that survive reading all of `data`; () among them means complete."""
    current = set(stacks)
    for b in data:
        current = {s for stack in current if stack for s in step_stack(stack, b)
                   if s is not LEFTOVER}
        if not current:
            break
    return frozenset(current)


def finishable(stack: tuple) -> bool:
    """Whether the document may end here: complete, or a top-level number that may stop."""
    return not stack or (len(stack) == 1 and stack[0][0].can_end(stack[0]))


# --------------------------------------------------------------------------- vocabulary

class _TrieNode:
    __slots__ = ("children", "ends", "depth", "_subtree")

    def __init__(self, depth: int):
        self.children: dict[int, _TrieNode] = {}
        self.ends: list[int] = []
        self.depth = depth
        self._subtree: np.ndarray | None = None

    def subtree(self) -> np.ndarray:
        """Ids of every token whose bytes start with this node's prefix."""
        if self._subtree is None:
            ids, todo = [], [self]
            while todo:
                node = todo.pop()
                ids.extend(node.ends)
                todo.extend(node.children.values())
            self._subtree = np.array(ids, dtype=np.int64)
        return self._subtree


@dataclass
class _Classification:
    """What each token does from one top frame, whatever lies below it.

    within: tokens read entirely inside the top value. pop_tokens[k] ends the top value and
    leaves suffixes[pop_suffix[k]] for the enclosing value. For string bodies, within_len and
    pop_len count the characters each token adds, so length limits can be applied afterwards.
    """

    within: np.ndarray
    within_len: np.ndarray
    pop_tokens: np.ndarray
    pop_suffix: np.ndarray
    pop_len: np.ndarray
    suffixes: list[bytes]


_ANY_STRING = StringNode()  # string bodies are classified without limits, once per vocabulary


class Vocabulary:
    """The token byte strings, their trie, and the per-vocabulary classification of string
    bodies. Build one per tokenizer and share it between constraints."""

    def __init__(self, tokens: Sequence[bytes | str | None]):
        self.tokens = [t.encode() if isinstance(t, str) else t for t in tokens]
        self.size = len(self.tokens)
        self.root = _TrieNode(0)
        for i, data in enumerate(self.tokens):
            if not data:  # special tokens and empty ones are never produced by the grammar
                continue
            node = self.root
            for b in data:
                if b not in node.children:
                    node.children[b] = _TrieNode(node.depth + 1)
                node = node.children[b]
            node.ends.append(i)
        self._string_bodies: dict = {}

    def missing_bytes(self, needed: Iterable[int]) -> list[int]:
        return sorted(b for b in set(needed) if b not in self.root.children
                      or not self.root.children[b].ends)

    def string_body(self, phase) -> _Classification:
        if phase not in self._string_bodies:
            self._string_bodies[phase] = classify(self, (_ANY_STRING, phase, 0))
        return self._string_bodies[phase]


def classify(vocab: Vocabulary, frame: tuple) -> _Classification:
    """Walk the vocabulary trie once from a single-frame stack (see _Classification)."""
    within = np.zeros(vocab.size, dtype=bool)
    within_len = np.zeros(vocab.size, dtype=np.int32)
    pops: list[tuple[_TrieNode, int, int]] = []  # (subtree, where the suffix starts, length)
    todo = [(vocab.root, frozenset([(frame,)]))]
    while todo:
        tnode, stacks = todo.pop()
        if tnode.ends:
            within[tnode.ends] = True
            within_len[tnode.ends] = _length(next(iter(stacks)))
        for b, child in tnode.children.items():
            nxt = set()
            for stack in stacks:
                for s in step_stack(stack, b):
                    if s is LEFTOVER:
                        pops.append((child, tnode.depth, _length(stack)))
                    elif not s:
                        pops.append((child, child.depth, _length(stack)))
                    else:
                        nxt.add(s)
            if nxt:
                todo.append((child, frozenset(nxt)))
    suffix_ids: dict[bytes, int] = {}
    tokens, suffix, lengths = [], [], []
    for tnode, start, length in pops:
        for t in tnode.subtree().tolist():
            tokens.append(t)
            suffix.append(suffix_ids.setdefault(vocab.tokens[t][start:], len(suffix_ids)))
            lengths.append(length)
    return _Classification(within, within_len, np.array(tokens, dtype=np.int64),
                           np.array(suffix, dtype=np.int64), np.array(lengths, dtype=np.int32),
                           list(suffix_ids))


def _length(stack: tuple) -> int:
    """Characters read so far when the stack is a lone string frame; 0 otherwise."""
    frame = stack[0]
    return frame[2] if len(stack) == 1 and isinstance(frame[0], StringNode) else 0


_GPT2_PRINTABLE = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]


def byte_level_vocab(token_to_id: dict[str, int], special_tokens: Iterable[str] = (),
                     size: int | None = None) -> list[bytes | None]:
    """Token bytes, by id, for a GPT-2-style byte-level BPE (`tokenizer.get_vocab()`).

    Byte-level BPE writes each byte as a printable character; this undoes that mapping.
    Special tokens (EOS, chat markers) map to None: the grammar never produces them.
    """
    to_byte = {chr(c): c for c in _GPT2_PRINTABLE}
    printable = set(_GPT2_PRINTABLE)
    others = [b for b in range(256) if b not in printable]
    to_byte.update({chr(256 + i): b for i, b in enumerate(others)})
    special = set(special_tokens)
    out: list[bytes | None] = [None] * (size or max(token_to_id.values()) + 1)
    for token, i in token_to_id.items():
        if token not in special and all(ch in to_byte for ch in token):
            out[i] = bytes(to_byte[ch] for ch in token)
    return out


_BYTE_FALLBACK = "<0x{:02X}>"  # SentencePiece's token for a raw byte


def sentencepiece_vocab(token_to_id: dict[str, int], special_tokens: Iterable[str] = (),
                        size: int | None = None) -> list[bytes | None]:
    """Token bytes, by id, for a SentencePiece vocabulary with byte fallback (Gemma, Llama 2):
    `▁` stands for a space and `<0xNN>` for a raw byte. Special tokens map to None."""
    raw = {_BYTE_FALLBACK.format(b): bytes([b]) for b in range(256)}
    special = set(special_tokens)
    out: list[bytes | None] = [None] * (size or max(token_to_id.values()) + 1)
    for token, i in token_to_id.items():
        if token not in special and i < len(out):
            out[i] = raw.get(token) or token.replace("\u2581", " ").encode()
    return out


def token_bytes(token_to_id: dict[str, int], special_tokens: Iterable[str] = (),
                size: int | None = None) -> list[bytes | None]:
    """Token bytes for either kind of byte-complete vocabulary: SentencePiece with byte
    fallback when it has the `<0xNN>` tokens, else GPT-2-style byte-level BPE."""
    if _BYTE_FALLBACK.format(ord("{")) in token_to_id:
        return sentencepiece_vocab(token_to_id, special_tokens, size)
    return byte_level_vocab(token_to_id, special_tokens, size)


# --------------------------------------------------------------------------- the constraint

@dataclass(frozen=True)
class State:
    """Where decoding stands: the possible parse stacks (one unless the schema is ambiguous),
    and whether EOS has been emitted."""

    stacks: frozenset
    finished: bool = False

    @property
    def complete(self) -> bool:
        """Whether the output so far is a whole valid value, so EOS may follow."""
        return not self.finished and any(finishable(s) for s in self.stacks)


class JsonConstraint:
    """Masks a decoder's tokens so that it emits a JSON value valid for `schema`.

    vocab[i] is token i's bytes (str is UTF-8 encoded; None for special tokens), e.g. from
    byte_level_vocab. The vocabulary must hold a one-byte token for every printable ASCII
    character, so that no state is a dead end; byte-level BPE always does.
    """

    MASK_CACHE_SIZE = 256  # masks are vocab-sized (32 KB each at 32k); rebuilding one is cheap

    def __init__(self, schema: dict, vocab: Vocabulary | Sequence[bytes | str | None],
                 eos_id: int, separators: tuple[str, str] = (", ", ": ")):
        problems = check_schema(schema)
        if problems:
            raise SchemaNotEnforceable(problems)
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(vocab)
        if not 0 <= eos_id < self.vocab.size:
            raise ValueError(f"eos_id {eos_id} is outside the vocabulary (size {self.vocab.size})")
        needed = set(range(0x20, 0x7F))
        if any(t and not _is_utf8(t) for t in self.vocab.tokens):
            needed |= set(range(0x80, 0xC0))  # tokens that stop inside a character need these
        missing = self.vocab.missing_bytes(needed)
        if missing:
            raise ValueError(f"the vocabulary has no single-byte token for {bytes(missing)!r}; "
                             "constrained decoding needs a byte-level vocabulary")
        self.schema, self.eos_id = schema, eos_id
        self.root = compile_schema(schema, separators)
        self._classes: dict[tuple, _Classification] = {}
        self._suffix_ok: dict[tuple, np.ndarray] = {}
        self._masks: dict[State, np.ndarray] = {}

    def start(self) -> State:
        return State(frozenset((frame,) for frame in self.root.starts()))

    def allowed(self, state: State) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens that may come next (read-only).

        Its length is the vocabulary's; pass byte_level_vocab(size=...) the model's logit
        width when the embedding is padded beyond the tokenizer.
        """
        mask = self._masks.get(state)
        if mask is None:
            mask = np.zeros(self.vocab.size, dtype=bool)
            if not state.finished:
                for stack in state.stacks:
                    if stack:
                        mask |= self._stack_mask(stack)
                mask[self.eos_id] = state.complete
            mask.setflags(write=False)
            if len(self._masks) >= self.MASK_CACHE_SIZE:
                self._masks.clear()
            self._masks[state] = mask
        return mask

    def advance(self, state: State, token_id: int) -> State:
        """The state after `token_id`; ValueError if the mask would not have allowed it."""
        if token_id == self.eos_id:
            if not state.complete:
                raise ValueError("EOS before the JSON value is complete")
            return State(frozenset(), finished=True)
        data = self.vocab.tokens[token_id] if 0 <= token_id < self.vocab.size else None
        stacks = feed(state.stacks, data) if data and not state.finished else frozenset()
        if not stacks:
            raise ValueError(f"token {token_id} ({data!r}) cannot continue the JSON value here")
        return State(stacks)

    def _stack_mask(self, stack: tuple) -> np.ndarray:
        top, below = stack[-1], stack[:-1]
        node = top[0]
        if isinstance(node, StringNode) and top[1] != _START:
            key = ("string", top[1])
            cls = self.vocab.string_body(top[1])
            room = np.iinfo(np.int32).max if node.max is None else node.max - top[2]
            mask = cls.within & (cls.within_len <= room)
            ok = (self._suffixes_ok(below, key, cls)[cls.pop_suffix]
                  & (cls.pop_len <= room) & (cls.pop_len >= node.min - top[2]))
        else:
            key = top
            cls = self._classes.get(top)
            if cls is None:
                cls = self._classes[top] = classify(self.vocab, top)
            mask = cls.within.copy()
            ok = self._suffixes_ok(below, key, cls)[cls.pop_suffix]
        mask[cls.pop_tokens[ok]] = True
        return mask

    def _suffixes_ok(self, below: tuple, key: tuple, cls: _Classification) -> np.ndarray:
        """Which of cls's suffixes the rest of the stack can read once the top value ended."""
        ok = self._suffix_ok.get((below, key))
        if ok is None:
            ok = np.array([not s or bool(below and feed([below], s)) for s in cls.suffixes],
                          dtype=bool)
            self._suffix_ok[(below, key)] = ok
        return ok


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
