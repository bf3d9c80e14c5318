"""Schema-constrained decoding: whatever a model samples under the mask validates.

A random "model" (seeded numpy logits) samples under the mask for many schemas, over a
byte-level BPE vocabulary trained in a fixture; every finished output must parse and validate
with jsonschema, EOS must only be allowed on a valid value, and no reachable state may leave
the mask empty. The fast mask (trie walks, per-frame caches) is checked against a brute-force
one that feeds every token's bytes through the automaton.
"""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distill_compiler.runtime.constrained import (
    JsonConstraint,
    SchemaNotEnforceable,
    Vocabulary,
    byte_level_vocab,
    check_schema,
    feed,
)

SPECIALS = ["<|pad|>", "<|im_end|>"]

FLAT = {"type": "object",
        "properties": {"intent": {"type": "string", "enum": ["billing", "refund", "other"]},
                       "order_id": {"type": "string", "maxLength": 12},
                       "urgent": {"type": "boolean"}},
        "required": ["intent", "order_id", "urgent"], "additionalProperties": False}
NESTED = {"type": "object",
          "properties": {"customer": {"type": "object",
                                      "properties": {"name": {"type": "string", "maxLength": 10},
                                                     "vip": {"type": "boolean"}},
                                      "required": ["name"]},
                         "note": {"type": ["string", "null"], "maxLength": 8}},
          "required": ["customer"]}
ARRAY_OF_OBJECTS = {"type": "object",
                    "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
                                             "items": {"type": "object",
                                                       "properties": {
                                                           "sku": {"type": "string",
                                                                   "minLength": 2,
                                                                   "maxLength": 6},
                                                           "qty": {"type": "integer"}},
                                                       "required": ["sku", "qty"]}}},
                    "required": ["items"]}
SCALARS = {"type": "object",
           "properties": {"count": {"type": "integer"}, "price": {"type": "number"},
                          "flag": {"type": "boolean"}, "nothing": {"type": "null"},
                          "level": {"enum": [1, 10, "high", None, True]},
                          "version": {"const": {"major": 2, "tags": ["a"]}}},
           "required": ["count", "price", "level"]}
OPTIONALS = {"type": "object",
             "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 4},
                            "c": {"type": "boolean"}, "d": {"type": "array", "maxItems": 2,
                                                            "items": {"type": "number"}}},
             "required": ["c"]}
ANY_OF = {"anyOf": [{"type": "integer"}, {"type": "number"},
                    {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"]},
                    {"type": "object", "properties": {"xy": {"type": "boolean"}}}]}
TOOL_CALL = {"type": "object",
             "properties": {"city": {"type": "string", "maxLength": 20,
                                     "description": "City name"},
                            "days": {"type": "integer", "title": "Days", "default": 1},
                            "units": {"type": "string", "enum": ["metric", "imperial"]},
                            "stops": {"type": "array", "maxItems": 2,
                                      "items": {"type": "string", "maxLength": 5}}},
             "required": ["city"], "$schema": "https://json-schema.org/draft/2020-12/schema"}
TOP_LEVEL = [{"type": "integer"}, {"type": "number"}, {"type": "string", "maxLength": 6},
             {"enum": [1, 10, 100]}, {"type": "array", "items": {"type": "boolean"},
                                      "maxItems": 4}]
SCHEMAS = [FLAT, NESTED, ARRAY_OF_OBJECTS, SCALARS, OPTIONALS, ANY_OF, TOOL_CALL, *TOP_LEVEL]


def corpus() -> list[str]:
    """JSON of the shapes above (so BPE learns tokens spanning structure) plus free text."""
    rng = random.Random(0)
    words = ["billing", "refund", "order", "charged", "twice", "München", "café", "naïve",
             "HB-1042", "€119", "日本", "🙂", "tab\there", 'say "hi"', "back\\slash"]
    docs = []
    for _ in range(600):
        docs.append(json.dumps({"intent": rng.choice(["billing", "refund", "other"]),
                                "order_id": f"A-{rng.randint(0, 99999)}",
                                "urgent": rng.random() < .5}, ensure_ascii=False))
        docs.append(json.dumps({"items": [{"sku": rng.choice(words)[:6], "qty": rng.randint(1, 9)}
                                          for _ in range(rng.randint(1, 3))],
                                "price": round(rng.uniform(0, 99), 2), "note": None}))
        docs.append(" ".join(rng.choices(words, k=8)))
    return docs


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=700, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def vocab(bpe) -> Vocabulary:
    return Vocabulary(byte_level_vocab(bpe.get_vocab(), SPECIALS, size=bpe.get_vocab_size()))


@pytest.fixture(scope="module")
def eos(bpe) -> int:
    return bpe.token_to_id("<|im_end|>")


def tiny_vocab(*multi: str) -> list[bytes | None]:
    """Every byte as a token, the given multi-character tokens, and a special EOS last."""
    return [bytes([b]) for b in range(256)] + [m.encode() for m in multi] + [None]


def validates(data: bytes, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(data.decode("utf-8")), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def sample(c: JsonConstraint, rng: np.random.Generator, max_tokens: int = 400,
           prefer: np.ndarray | None = None) -> tuple[bytes, bool, list]:
    """Sample under the mask; check at every step that the mask is not empty and that EOS is
    offered only on a valid value. Returns (text, finished, states visited)."""
    state, out, states = c.start(), b"", []
    for _ in range(max_tokens):
        states.append(state)
        mask = c.allowed(state)
        assert mask.any(), f"dead end after {out!r}"
        assert not mask[c.eos_id] or validates(out, c.schema), f"EOS offered after {out!r}"
        logits = rng.normal(size=mask.size) * 2 + (0 if prefer is None else prefer)
        logits[~mask] = -np.inf
        token = int(np.argmax(logits))
        if token == c.eos_id:
            return out, True, states
        out += c.vocab.tokens[token]
        state = c.advance(state, token)
    return out, False, states


def brute_force_mask(c: JsonConstraint, state) -> np.ndarray:
    """Allowed tokens by feeding each token's bytes to the automaton, one by one."""
    mask = np.array([bool(t) and bool(feed(state.stacks, t)) for t in c.vocab.tokens])
    mask[c.eos_id] = state.complete
    return mask


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: json.dumps(s)[:40])
def test_random_model_outputs_always_validate(schema, vocab, eos):
    c = JsonConstraint(schema, vocab, eos)
    rng = np.random.default_rng(1)
    # Favour EOS and tokens that close something, so unbounded numbers end within the budget.
    prefer = np.array([3.0 if t and any(b in t for b in b',]}') else 0.0 for t in vocab.tokens])
    prefer[eos] = 3
    finished = 0
    for _ in range(25):
        out, done, _ = sample(c, rng, prefer=prefer)
        if done:
            finished += 1
            assert validates(out, schema), out
    assert finished >= 20


@pytest.mark.parametrize("schema", [FLAT, SCALARS, ARRAY_OF_OBJECTS, ANY_OF, TOP_LEVEL[3]],
                         ids=["flat", "scalars", "array_of_objects", "any_of", "enum"])
def test_fast_mask_equals_brute_force(schema, vocab, eos):
    c = JsonConstraint(schema, vocab, eos)
    rng = np.random.default_rng(2)
    for _ in range(3):
        _, _, states = sample(c, rng, max_tokens=60)
        for state in states[::3]:
            fast = c.allowed(state)
            slow = brute_force_mask(c, state)
            diff = np.flatnonzero(fast != slow)
            assert not diff.size, [(vocab.tokens[i], fast[i]) for i in diff[:5]]


def test_canonical_serialisations_are_accepted_token_by_token(bpe, vocab, eos):
    """What json.dumps writes for a valid instance (schema property order) is never masked."""
    instances = [(FLAT, {"intent": "refund", "order_id": "A-12", "urgent": False}),
                 (NESTED, {"customer": {"name": "Zoë 🙂", "vip": True}, "note": None}),
                 (ARRAY_OF_OBJECTS, {"items": [{"sku": "tab\th", "qty": 3},
                                               {"sku": 'a"b\\c', "qty": -10}]}),
                 (SCALARS, {"count": 0, "price": -1.5e-3, "level": 10,
                            "version": {"major": 2, "tags": ["a"]}}),
                 (OPTIONALS, {"b": "日本", "c": True}),
                 (ANY_OF, {"xy": False})]
    for separators in [(", ", ": "), (",", ":")]:
        for schema, value in instances:
            c = JsonConstraint(schema, vocab, eos, separators=separators)
            text = json.dumps(value, ensure_ascii=False, separators=separators)
            state = c.start()
            for token in bpe.encode(text).ids:
                assert c.allowed(state)[token], (text, vocab.tokens[token])
                state = c.advance(state, token)
            assert c.allowed(state)[eos]


# --------------------------------------------------------------------------- spanning tokens

SPANNING = ['"}', '":"', ', "', '": "', '"}, {"', '": {"', '{"name": "', '", "', '"]',
            '": [', 'true}', '1,', '"a": ']


def teacher_force(c: JsonConstraint, text: str):
    state = c.start()
    for b in text.encode():
        state = c.advance(state, b)  # token id b is the single byte b in tiny_vocab
    return state


def test_tokens_spanning_structure_are_allowed_exactly_when_the_rest_fits():
    vocab = tiny_vocab(*SPANNING)
    eos, tid = len(vocab) - 1, {t: 256 + i for i, t in enumerate(SPANNING)}
    required_next = {"type": "object", "properties": {"name": {"type": "string"},
                                                      "b": {"type": "integer"}},
                     "required": ["name", "b"]}
    optional_next = {**required_next, "required": ["name"]}
    c = JsonConstraint(required_next, vocab, eos)
    mask = c.allowed(teacher_force(c, '{"name": "xy'))
    assert mask[tid['", "']] and not mask[tid['"}']] and not mask[tid['"]']]
    c = JsonConstraint(optional_next, vocab, eos)
    mask = c.allowed(teacher_force(c, '{"name": "xy'))
    assert mask[tid['", "']] and mask[tid['"}']]
    assert c.allowed(c.start())[tid['{"name": "']]
    # A number ends inside a token: '1,' continues an array of integers, not a top-level one.
    ints = {"type": "array", "items": {"type": "integer"}}
    c = JsonConstraint(ints, vocab, eos)
    assert c.allowed(teacher_force(c, "["))[tid["1,"]]
    c = JsonConstraint({"type": "integer"}, vocab, eos)
    assert not c.allowed(c.start())[tid["1,"]]


def test_sampling_with_spanning_tokens_uses_them_and_validates():
    vocab = tiny_vocab(*SPANNING)
    eos = len(vocab) - 1
    prefer = np.zeros(len(vocab))
    prefer[256:] = 4  # make the multi-character tokens likely whenever they fit
    prefer[eos] = 4
    rng = np.random.default_rng(3)
    used = 0
    for schema in [FLAT, NESTED, ARRAY_OF_OBJECTS, TOOL_CALL]:
        c = JsonConstraint(schema, vocab, eos)
        for _ in range(10):
            out, done, _ = sample(c, rng, prefer=prefer)
            assert done and validates(out, schema), out
            used += sum(out.count(t.encode()) for t in SPANNING)
    assert used > 50


# --------------------------------------------------------------------------- strings, numbers, EOS

def test_max_length_string_still_allows_the_closing_quote():
    vocab = tiny_vocab(*SPANNING)
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 3}},
              "required": ["s"]}
    c = JsonConstraint(schema, vocab, len(vocab) - 1)
    state = teacher_force(c, '{"s": "a\\né')  # a, an escape and a 2-byte character: 3 characters
    assert {vocab[i] for i in np.flatnonzero(c.allowed(state))} == {b'"', b'"}'}


def test_min_length_forbids_an_early_closing_quote():
    vocab = tiny_vocab()
    c = JsonConstraint({"type": "string", "minLength": 2}, vocab, len(vocab) - 1)
    assert not c.allowed(teacher_force(c, '"a'))[ord('"')]
    assert c.allowed(teacher_force(c, '"ab'))[ord('"')]


def test_strings_reject_raw_control_characters_bad_escapes_and_lone_surrogates():
    vocab = tiny_vocab()
    c = JsonConstraint({"type": "string"}, vocab, len(vocab) - 1)
    for bad in ['"\n', '"\\x', '"\\ud800', '"\\uDC00']:
        with pytest.raises(ValueError):
            teacher_force(c, bad)
    for byte in (0xFF, 0xC0):  # never valid in UTF-8
        assert not c.allowed(teacher_force(c, '"'))[byte]
    assert teacher_force(c, '"\\u00e9\\uD7FF\\n\\"€"').complete


def test_integer_forbids_fraction_and_exponent_number_allows_them():
    vocab = tiny_vocab()
    eos = len(vocab) - 1
    integer = JsonConstraint({"type": "integer"}, vocab, eos)
    mask = integer.allowed(teacher_force(integer, "12"))
    assert mask[eos] and not mask[ord(".")] and not mask[ord("e")]
    assert not integer.allowed(teacher_force(integer, "0"))[ord("1")]  # no leading zeros
    number = JsonConstraint({"type": "number"}, vocab, eos)
    assert number.allowed(teacher_force(number, "-0.5e"))[ord("+")]
    assert not number.allowed(teacher_force(number, "-0.5e"))[eos]
    assert not number.allowed(teacher_force(number, "-"))[eos]


def test_enum_allows_only_prefixes_of_its_literals_and_ends_on_any_whole_one():
    vocab = tiny_vocab()
    eos = len(vocab) - 1
    c = JsonConstraint({"enum": [1, 10, "on"]}, vocab, eos)
    assert {vocab[i] for i in np.flatnonzero(c.allowed(c.start()))} == {b"1", b'"'}
    mask = c.allowed(teacher_force(c, "1"))
    assert mask[eos] and mask[ord("0")] and not mask[ord("1")]
    assert not c.allowed(teacher_force(c, '"o'))[eos]


def test_properties_come_in_schema_order_and_required_ones_cannot_be_skipped():
    vocab = tiny_vocab()
    c = JsonConstraint(OPTIONALS, vocab, len(vocab) - 1)  # a, b optional; c required; d optional
    firsts = {'{"a', '{"b', '{"c'}
    for key in firsts:
        teacher_force(c, key)
    with pytest.raises(ValueError):
        teacher_force(c, '{"d')
    with pytest.raises(ValueError):
        teacher_force(c, '{"b": "x", "a')
    with pytest.raises(ValueError):
        teacher_force(c, '{"a": 1}')


def test_eos_and_advance_guard_the_caller():
    vocab = tiny_vocab()
    eos = len(vocab) - 1
    c = JsonConstraint(FLAT, vocab, eos)
    with pytest.raises(ValueError, match="EOS before"):
        c.advance(c.start(), eos)
    with pytest.raises(ValueError, match="cannot continue"):
        c.advance(c.start(), ord("["))
    done = c.advance(teacher_force(c, '{"intent": "other", "order_id": "", "urgent": true}'), eos)
    assert done.finished and not c.allowed(done).any()


def test_byte_level_vocab_round_trips_the_tokenizer(bpe, vocab):
    text = 'Zoë paid €119 🙂 {"a": [1, 2]}\n'
    assert b"".join(vocab.tokens[i] for i in bpe.encode(text).ids) == text.encode()
    assert vocab.tokens[bpe.token_to_id("<|im_end|>")] is None


def test_vocabulary_without_single_byte_tokens_is_refused():
    with pytest.raises(ValueError, match="single-byte token"):
        JsonConstraint(FLAT, ["{", "}", '"', None], eos_id=3)


# --------------------------------------------------------------------------- check_schema

def test_supported_schemas_pass_the_check():
    for schema in SCHEMAS:
        assert check_schema(schema) == []


@pytest.mark.parametrize("schema, expected", [
    ({"type": "object", "properties": {"date": {"type": "string", "format": "date"}}},
     "properties.date.format: 'format' cannot be enforced"),
    ({"type": "string", "pattern": "^[A-Z]+$"}, "pattern: 'pattern' is not supported"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/x"}}},
     "properties.x.$ref: '$ref' is not supported"),
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "oneOf: 'oneOf' is not supported"),
    ({"type": "array", "items": {"type": "integer", "minimum": 0}},
     "items.minimum: 'minimum': numeric bounds"),
    ({"type": "integer", "maxLength": 3}, "maxLength: 'maxLength' does not apply to type"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "requried": ["a"]},
     "requried: 'requried' cannot be enforced"),
    ({"type": "object", "properties": {}, "required": ["a"]},
     "required: required property 'a' is not in 'properties'"),
    ({"type": "object", "properties": {"a": {}}}, "properties.a: no 'type'"),
    ({"type": "array"}, "items: an array needs 'items'"),
    ({"type": "object", "additionalProperties": {"type": "string"}},
     "additionalProperties: a schema-valued 'additionalProperties'"),
    ({"type": "string", "enum": ["a"], "maxLength": 3}, "maxLength: 'maxLength' next to 'enum'"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength: 'minLength' 5 is greater"),
    ({"type": "string", "enum": ["a", 1]}, 'enum: 1 is not of type "string"'),
    ({"anyOf": [{"type": "string"}, {"type": "string", "format": "email"}]},
     "anyOf.1.format: 'format'"),
    ({"type": "strng"}, "type: 'type' must be one of"),
])
def test_check_schema_names_each_unenforceable_keyword_with_its_path(schema, expected):
    problems = check_schema(schema)
    assert any(p.startswith(expected) for p in problems), problems


def test_constraint_refuses_an_unenforceable_schema_listing_every_problem():
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                               "n": {"type": "integer", "maximum": 3}}}
    with pytest.raises(SchemaNotEnforceable) as info:
        JsonConstraint(schema, tiny_vocab(), eos_id=256)
    assert [p.split(":")[0] for p in info.value.problems] == ["properties.d.format",
                                                               "properties.n.maximum"]


def test_sentencepiece_vocabularies_map_spaces_and_byte_fallback():
    """Gemma-style vocabularies: `▁` is a space and `<0xNN>` a raw byte; both kinds of
    vocabulary are told apart by the byte-fallback tokens."""
    from distill_compiler.runtime.constrained import sentencepiece_vocab, token_bytes

    vocab = {"<pad>": 0, "<eos>": 1, "▁the": 2, "{\"": 3, **{f"<0x{b:02X}>": 4 + b for b in range(256)}}
    tokens = sentencepiece_vocab(vocab, ["<pad>", "<eos>"])
    assert tokens[:4] == [None, None, b" the", b'{"'] and tokens[4 + 0x7B] == b"{"
    assert token_bytes(vocab, ["<pad>", "<eos>"]) == tokens
    constraint = JsonConstraint({"type": "boolean"}, tokens, eos_id=1)
    state = constraint.advance(constraint.start(), 4 + ord("t"))
    assert constraint.allowed(state)[4 + ord("r")] and not constraint.allowed(state)[2]
    byte_level = {"Ġthe": 0, "a": 1}
    assert token_bytes(byte_level) == [b" the", b"a"]
