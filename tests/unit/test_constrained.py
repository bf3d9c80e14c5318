"""Schema-constrained decoding through llguidance: whatever a model samples under the mask
validates.

A random "model" (seeded numpy logits) samples under the mask for many schemas, over a
byte-level BPE trained in a fixture and over a SentencePiece-style byte-fallback vocabulary;
every finished output must parse and validate with jsonschema, the END marker must only be
offered on a valid value, and no reachable state may leave the mask empty. The schemas use the
keywords users paste from real tools (pattern, format, bounds, oneOf, const, $ref, prefixItems,
additionalProperties with a schema). The agent grammar is sampled the same way for each
tool_choice. `check_schema` names the keyword llguidance cannot compile, with its path.
"""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest
from tiny_causal import SPECIALS as CHAT_SPECIALS
from tiny_causal import TOOLS, fixture_chat_text
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from distill_compiler.runtime.chat_format import (
    CALL_CLOSE,
    CALL_OPEN,
    ChatFormat,
    render_call,
)
from distill_compiler.runtime.constrained import (
    JsonConstraint,
    Vocabulary,
    tool_call_grammar,
)
from distill_compiler.runtime.enforceable import (
    SchemaNotEnforceable,
    check_schema,
    decoding_schema,
    schema_problems,
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
                                             "items": {"type": "object", "properties": {
                                                 "sku": {"type": "string", "minLength": 2,
                                                         "maxLength": 6},
                                                 "qty": {"type": "integer"}},
                                                 "required": ["sku", "qty"]}}},
                    "required": ["items"]}
# The keywords the hand-written engine refused, each bounded so a random model finishes.
PATTERN = {"type": "object", "properties": {"order_id": {"type": "string",
                                                         "pattern": "^HB-[0-9]{5}$"}},
           "required": ["order_id"]}
DATE = {"type": "object", "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"]}
BOUNDS = {"type": "object",
          "properties": {"qty": {"type": "integer", "minimum": 1, "maximum": 20},
                         "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 500},
                         "pack": {"type": "integer", "multipleOf": 6, "minimum": 0,
                                  "maximum": 60}},
          "required": ["qty", "price", "pack"]}
ANY_OF = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                    {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"]},
                    {"type": "string", "maxLength": 4}]}
ONE_OF = {"type": "object",
          "properties": {"refund": {"oneOf": [{"type": "boolean"},
                                              {"type": "string", "enum": ["partial"]}]}},
          "required": ["refund"]}
CONST = {"type": "object", "properties": {"version": {"const": {"major": 2, "tags": ["a"]}},
                                          "kind": {"const": "order"}},
         "required": ["version", "kind"]}
REFS = {"type": "object", "$defs": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
            "address": {"type": "object", "properties": {"city": {"type": "string",
                                                                   "maxLength": 8},
                                                          "zip": {"$ref": "#/$defs/id"}},
                        "required": ["city", "zip"]}},
        "properties": {"order_id": {"$ref": "#/$defs/id"},
                       "ship_to": {"$ref": "#/$defs/address"}},  # a $ref to a $ref
        "required": ["order_id", "ship_to"]}
PREFIX_ITEMS = {"type": "object",
                "properties": {"range": {"type": "array", "items": False, "prefixItems": [
                    {"type": "string", "format": "date"}, {"type": "integer", "minimum": 1,
                                                            "maximum": 30}]}},
                "required": ["range"]}
MAP = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 5}},
       "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
       "maxProperties": 3, "required": ["label"]}
SCHEMAS = {"flat": FLAT, "nested": NESTED, "array_of_objects": ARRAY_OF_OBJECTS,
           "pattern": PATTERN, "date": DATE, "bounds": BOUNDS, "any_of": ANY_OF,
           "one_of": ONE_OF, "const": CONST, "refs": REFS, "prefix_items": PREFIX_ITEMS,
           "additional_properties_schema": MAP,
           "top_level_enum": {"enum": [1, 10, "high", None]},
           "top_level_integer": {"type": "integer", "minimum": -5, "maximum": 5000}}


def corpus() -> list[str]:
    """JSON of the shapes above (so BPE learns tokens spanning structure) plus free text."""
    rng = random.Random(0)
    words = ["billing", "refund", "order", "charged", "twice", "München", "café", "naïve",
             "HB-1042", "€119", "日本", "🙂", "tab\there", 'say "hi"', "back\\slash"]
    docs = []
    for _ in range(600):
        docs.append(json.dumps({"intent": rng.choice(["billing", "refund", "other"]),
                                "order_id": f"HB-{rng.randint(10000, 99999)}",
                                "urgent": rng.random() < .5}, ensure_ascii=False))
        docs.append(json.dumps({"items": [{"sku": rng.choice(words)[:6], "qty": rng.randint(1, 9)}
                                          for _ in range(rng.randint(1, 3))],
                                "day": f"2025-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
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
    return Vocabulary(bpe.to_str(), bpe.get_vocab_size(), [bpe.token_to_id("<|im_end|>")])


def validates(data: bytes, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(data.decode("utf-8")), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def sample(constraint: JsonConstraint, rng: np.random.Generator, schema: dict | None,
           max_tokens: int = 300, prefer: np.ndarray | None = None,
           lead: list[int] = ()) -> tuple[bytes, bool]:
    """Sample under the mask (forced tokens as the decoder takes them), after the tokens
    `lead`; check at every step that the mask is not empty and, for a schema, that the END
    marker is offered only on a valid value. Returns (text, whether the END marker came)."""
    guide = constraint.start()
    for token in lead:
        assert guide.mask()[token]
        guide.advance(token)
    out = b"".join(constraint.vocab.token_bytes(t) for t in lead)
    end = constraint.vocab.stop_ids[0]
    for _ in range(max_tokens):
        token = guide.forced()
        if token is None:
            mask = guide.mask()
            assert mask.any(), f"dead end after {out!r}"
            if schema is not None:
                assert not mask[end] or validates(out, schema), f"END offered after {out!r}"
            logits = rng.normal(size=mask.size) * 2 + (0 if prefer is None else prefer)
            logits[~mask] = -np.inf
            token = int(np.argmax(logits))  # Gumbel-like: a random choice among the allowed
        guide.advance(token)
        if token == end:
            return out, True
        out += constraint.vocab.token_bytes(token)
    return out, False


def closing_preference(vocab: Vocabulary) -> np.ndarray:
    """Favour the END marker and tokens that close something, so values end within budget."""
    prefer = np.array([3.0 if any(b in vocab.token_bytes(t) for b in b',]}"') else 0.0
                       for t in range(vocab.size)])
    prefer[vocab.stop_ids] = 3
    return prefer


# --------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("name", SCHEMAS)
def test_random_model_outputs_always_validate(name, vocab):
    schema = SCHEMAS[name]
    constraint = JsonConstraint.for_schema(schema, vocab)
    rng, prefer = np.random.default_rng(1), closing_preference(vocab)
    finished = 0
    for _ in range(20):
        out, done = sample(constraint, rng, schema, prefer=prefer)
        if done:
            finished += 1
            assert validates(out, schema), out
    assert finished >= 15


def test_canonical_serialisations_are_accepted_token_by_token(bpe, vocab):
    """What json.dumps writes for a valid instance, tokenized as training tokenizes it, is
    never masked: the runtime can emit every target the student learns."""
    instances = [(FLAT, {"intent": "refund", "order_id": "A-12", "urgent": False}),
                 (NESTED, {"customer": {"name": "Zoë 🙂", "vip": True}, "note": None}),
                 (ARRAY_OF_OBJECTS, {"items": [{"sku": "tab\th", "qty": 3},
                                               {"sku": 'a"b\\c', "qty": -10}]}),
                 (PATTERN, {"order_id": "HB-12345"}), (DATE, {"day": "2025-02-28"}),
                 (BOUNDS, {"qty": 20, "price": 0.5, "pack": 12}), (ONE_OF, {"refund": "partial"}),
                 (CONST, {"version": {"major": 2, "tags": ["a"]}, "kind": "order"}),
                 (REFS, {"order_id": "AB123", "ship_to": {"city": "Leith", "zip": "EH006"}}),
                 (PREFIX_ITEMS, {"range": ["2025-01-01", 3]}), (MAP, {"label": "x", "n": 4})]
    for schema, value in instances:
        jsonschema.validate(value, schema)
        guide = JsonConstraint.for_schema(schema, vocab).start()
        for token in bpe.encode(json.dumps(value, ensure_ascii=False)).ids:
            assert guide.mask()[token], (value, bpe.id_to_token(token))
            guide.advance(token)
        assert guide.accepting and guide.mask()[vocab.stop_ids[0]]


def test_keyword_bounds_are_enforced_not_just_sampled(bpe, vocab):
    """Values the schema excludes cannot be spelled: the mask refuses their tokens."""
    for schema, invalid in [(PATTERN, '{"order_id": "HB-1234"}'), (DATE, '{"day": "2025-13-01"}'),
                            (BOUNDS, '{"qty": 21'), (BOUNDS, '{"qty": 2, "price": 0,'),
                            (BOUNDS, '{"qty": 2, "price": 1, "pack": 7}'),
                            (CONST, '{"version": {"major": 3'), (REFS, '{"order_id": "ab'),
                            (PREFIX_ITEMS, '{"range": ["2025-01-01", 3, '),
                            (MAP, '{"label": "x", "n": "')]:
        guide = JsonConstraint.for_schema(schema, vocab).start()
        ids = bpe.encode(invalid).ids
        accepted = 0
        for token in ids:
            if not guide.mask()[token]:
                break
            guide.advance(token)
            accepted += 1
        assert accepted < len(ids) or not guide.accepting, invalid


def test_only_declared_properties_in_schema_order(vocab):
    """Objects are closed where the schema is silent: the student writes the keys it was
    trained on, in the schema's order (optional ones may be skipped)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                     "maximum": 9},
                                               "b": {"type": "boolean"}}}
    assert decoding_schema(schema)["additionalProperties"] is False
    assert "additionalProperties" not in decoding_schema(MAP)["properties"]["label"]
    constraint = JsonConstraint.for_schema(schema, vocab)
    rng = np.random.default_rng(4)
    for _ in range(15):
        out, done = sample(constraint, rng, schema, prefer=closing_preference(vocab))
        assert done
        value = json.loads(out)
        assert list(value) == [k for k in ("a", "b") if k in value]
        assert out.decode() == json.dumps(value)  # the training layout: ", " and ": "


def test_sentencepiece_byte_fallback_vocabulary():
    """Gemma-style vocabularies: `▁` is a space and `<0xNN>` a raw byte; llguidance reads both
    from tokenizer.json, and characters without a piece are spelled byte by byte."""
    pieces = ["<pad>", "<eos>", *(f"<0x{b:02X}>" for b in range(256)),
              "▁", "t", "r", "u", "e", "a", "l", "s", "f", "o", "n", "▁the", "tr"]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[("t", "r")],
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("<eos>", special=True)])
    vocab = Vocabulary(tok.to_str(), len(pieces), [1])
    assert vocab.token_bytes(pieces.index("▁the")) == b" the"
    assert vocab.token_bytes(pieces.index("<0xC3>")) == b"\xc3"
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[éa-z]{1,6}$"},
                                               "ok": {"type": "boolean"}},
              "required": ["city", "ok"]}
    constraint = JsonConstraint.for_schema(schema, vocab)
    rng = np.random.default_rng(5)
    for _ in range(10):
        out, done = sample(constraint, rng, schema, prefer=closing_preference(vocab))
        assert done and validates(out, schema), out


# --------------------------------------------------------------------------- agent calls

CHAT = ChatFormat()


@pytest.fixture(scope="module")
def chat_vocab():
    """The fixture students' tokenizer (tiny_causal.build_chat_tokenizer without the
    transformers wrapper): trained on rendered calls, so it has `"}}</`-style tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(fixture_chat_text(), trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, special_tokens=list(CHAT_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok, Vocabulary(tok.to_str(), tok.get_vocab_size(), [tok.token_to_id("<|im_end|>")])


REAL_TOOLS = [*TOOLS,
              {"name": "reschedule", "parameters": {
                  "type": "object", "$defs": {"day": {"type": "string", "format": "date"}},
                  "properties": {"order_id": {"type": "string", "pattern": "^A[0-9]{2}$"},
                                 "day": {"$ref": "#/$defs/day"},
                                 "slot": {"anyOf": [{"type": "integer", "minimum": 8,
                                                     "maximum": 18}, {"const": "any"}]}},
                  "required": ["order_id", "day", "slot"]}}]


@pytest.mark.parametrize("choice", ["auto", "required", "none"])
def test_sampled_agent_answers_call_only_valid_tools(choice, chat_vocab):
    tokenizer, vocab = chat_vocab
    constraint = JsonConstraint.for_tools(REAL_TOOLS, choice, vocab)
    params = {t["name"]: t["parameters"] for t in REAL_TOOLS}
    prefer = closing_preference(vocab)
    prefer[tokenizer.encode(CALL_OPEN, add_special_tokens=False).ids] += 3  # tempt "none"
    # A random walk seldom spells CALL_OPEN: auto answers open with text and a call, then the
    # call and what follows are sampled ("required" opens with one by itself).
    lead = tokenizer.encode(f"Sure. {CALL_OPEN}").ids if choice == "auto" else []
    rng, calls = np.random.default_rng(6), 0
    for _ in range(12):
        out, done = sample(constraint, rng, None, max_tokens=200, prefer=prefer, lead=lead)
        text = out.decode("utf-8", errors="replace")
        message = CHAT.parse(text)
        for call in message.get("tool_calls") or ():
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                params[call["function"]["name"]])
            calls += 1
        if choice == "none":
            assert CALL_OPEN not in text
        if choice == "required":
            assert text.startswith(CALL_OPEN)
        if done:  # every call opened was closed and parses
            assert text.count(CALL_OPEN) == text.count(CALL_CLOSE) == len(
                message.get("tool_calls") or ())
    assert (calls == 0) if choice == "none" else (calls >= 10)


def test_rendered_calls_are_accepted_and_crossing_tokens_close_them(chat_vocab):
    """The call format the student is trained on (BPE merges the JSON's last bytes with the
    closing marker, `"}}</`) is accepted token by token, and the rest of CALL_CLOSE is
    forced."""
    tokenizer, vocab = chat_vocab
    constraint = JsonConstraint.for_tools(TOOLS, "auto", vocab)
    text = "Let me check. " + render_call("get_order", {"order_id": "A12"}) + "Done."
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert '"}}</' in [tokenizer.decode([i]) for i in ids]
    guide = constraint.start()
    for token in ids:
        assert guide.mask()[token], tokenizer.decode([token])
        guide.advance(token)
    assert guide.accepting
    guide = constraint.start()
    for token in tokenizer.encode('<tool_call>{"name": "get_order", "arguments": '
                                  '{"order_id": "A12"}}', add_special_tokens=False).ids:
        guide.advance(token)
    forced = []
    while (token := guide.forced()) is not None:
        forced.append(token)
        guide.advance(token)
    assert CALL_CLOSE.startswith(tokenizer.decode(forced)) and forced
    assert not guide.mask()[vocab.stop_ids[0]]  # the turn cannot end inside the marker


def test_unknown_tool_choice_is_refused():
    with pytest.raises(ValueError, match="tool_choice"):
        tool_call_grammar(TOOLS, "sometimes")


# --------------------------------------------------------------------------- check_schema

def test_every_sampled_schema_and_real_tool_passes_the_check():
    for schema in [*SCHEMAS.values(), *(t["parameters"] for t in REAL_TOOLS)]:
        assert check_schema(schema) == [], schema


@pytest.mark.parametrize("schema, path, reason", [
    ({"type": "object", "properties": {"d": {"type": "string", "format": "bogus"}}},
     ("properties", "d", "format"), "Unknown format: bogus"),
    ({"type": "string", "pattern": "(?<=a)b"}, ("pattern",), "look-around"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
     ("properties", "x", "$ref"), "does not exist"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, ("uniqueItems",),
     "Unimplemented"),
    ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, ("anyOf", 1, "not"),
     "Unimplemented"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}, ("oneOf",), "oneOf"),
    ({"type": "object", "properties": {}, "required": ["a"]}, ("required",), "unsatisfiable"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, ("minLength",), "greater than"),
    ({"type": "object", "$defs": {"a": {"type": "object", "properties": {"b": {
        "$ref": "#/$defs/c"}}}, "c": {"type": "string", "format": "nope"}},
      "properties": {"a": {"$ref": "#/$defs/a"}}}, ("$defs", "c", "format"), "nope"),
])
def test_check_schema_names_what_llguidance_refuses_with_its_path(schema, path, reason):
    [(where, message)] = schema_problems(schema)
    assert where == path and reason in message, (where, message)
    assert message.startswith(f"'{path[-1]}' cannot be enforced") or path[-1] == 1


def test_every_problem_is_listed_at_once():
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "bogus"},
                                               "n": {"type": "integer", "not": {"const": 3}}}}
    assert [p.split(":")[0] for p in check_schema(schema)] == ["properties.d.format",
                                                              "properties.n.not"]
    assert check_schema(["not", "a", "schema"])[0].startswith("<root>: this schema")


def test_constraint_refuses_a_schema_llguidance_rejects_saying_where(vocab):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True,
                                                        "items": {"type": "string"}}}}
    with pytest.raises(SchemaNotEnforceable) as info:
        JsonConstraint.for_schema(schema, vocab)
    assert info.value.problems[0].startswith("properties.tags.uniqueItems: ")
    tools = [{"name": "tag", "parameters": schema}]
    with pytest.raises(SchemaNotEnforceable, match="tag.properties.tags.uniqueItems"):
        JsonConstraint.for_tools(tools, "auto", vocab)
