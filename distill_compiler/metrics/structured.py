"""Metrics of a causal-LM student's structured answers (tool calls, JSON extractions) against its
teacher's and, where records carry one, gold.

As in `metrics`, "agreement" compares the student with the teacher and "accuracy" with gold.

Every comparison of JSON values goes through `canonical`, so one rule decides what "the same
value" means everywhere (exact match, argument triples, field leaves, arrays):

- strings: Unicode NFKC, case-folded, runs of whitespace as one space, trimmed. Differences of
  case and spacing are formatting noise in a paraphrased city or a copied id, not a wrong value;
  an enum the tool cannot accept in another case is caught by schema validity, not here.
- numbers by value (`1 == 1.0`); booleans stay apart from numbers (`true != 1`), strings from
  numbers (`"5" != 5`), null is a value like any other.
- objects: member order ignored, keys compared exactly.
- arrays as multisets: order ignored, repeats counted.

Field-level scores flatten a value into leaves, `(dotted path, canonical value)`: `slots.city`
for nested objects, and `slots[]` for each array element taken whole, so an element (a SNIPS
slot `{"type", "value"}`) is right only when all of it is.

Student output may be malformed (content None, arguments that are not JSON, a call to a tool
nobody offered): it scores as wrong, never raises.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonschema.validators import validator_for

from .classify import rate

MALFORMED = object()  # what `parse_json` returns for text that is not JSON


# ---------------------------------------------------------------------------- normal form


def canonical(value: Any) -> str:
    """The normal form JSON values are compared in: two values are the same iff their canonical
    forms are equal (see the module docstring for the rules)."""
    return json.dumps(_normal(value), ensure_ascii=False, sort_keys=True)


def _same(answer: Any, reference: Any) -> bool:
    """A parsed student value (maybe MALFORMED) equals the reference in canonical form."""
    return answer is not MALFORMED and canonical(answer) == canonical(reference)


def _normal(value: Any) -> Any:
    if isinstance(value, str):
        return fold(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted((_normal(v) for v in value),
                      key=lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True))
    return value


def fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def parse_json(text: Any) -> Any:
    """A JSON text as a value; MALFORMED when it does not parse or is None. An already parsed
    value (a dict or list) is returned as it is."""
    if text is None:
        return MALFORMED
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return MALFORMED


def leaves(value: Any, path: str = "") -> Counter:
    """The multiset of `(path, canonical value)` leaves of a JSON value."""
    out: Counter = Counter()
    if isinstance(value, dict):
        for key, member in value.items():
            out.update(leaves(member, f"{path}.{key}" if path else key))
    elif isinstance(value, list):
        out.update((f"{path}[]", canonical(v)) for v in value)
    else:
        out[(path, canonical(value))] += 1
    return out


def prf(hits: int, predicted: int, true: int) -> dict:
    """Precision, recall and F1 from counts, with `metrics.per_label`'s conventions: precision is
    None when nothing was predicted, F1 None when there was nothing either way."""
    precision, recall = rate(hits, predicted), rate(hits, true)
    f1 = (2 * precision * recall / (precision + recall)
          if precision and recall else (0.0 if predicted or true else None))
    return {"precision": precision, "recall": recall, "f1": f1}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------- extract


def extraction_agrees(predicted: str | None, reference: Any) -> bool:
    """The student's answer text is JSON equal to `reference` in canonical form."""
    return _same(parse_json(predicted), reference)


def field_scores(answers: Sequence[Any], references: Sequence[Any]) -> dict:
    """Micro precision/recall/F1 over leaves, and per field (leaf path) with its support (the
    reference's leaf count). Fields only the student produced appear with support 0."""
    hits, predicted, true = Counter(), Counter(), Counter()
    for answer, reference in zip(answers, references):
        got = leaves(answer) if answer is not MALFORMED else Counter()
        want = leaves(reference)
        for counts, pairs in ((hits, got & want), (predicted, got), (true, want)):
            for (path, _), n in pairs.items():
                counts[path] += n
    per_field = {path: {**prf(hits[path], predicted[path], true[path]), "support": true[path]}
                 for path in sorted(predicted.keys() | true.keys())}
    return {**prf(sum(hits.values()), sum(predicted.values()), sum(true.values())),
            "per_field": per_field}


def extract_report(predicted: Sequence[str | None], target: Sequence[Any],
                   gold: Sequence[Any | None], schema: dict) -> dict:
    """An extract student's answers (JSON texts, None when it produced none) against the
    teacher's objects and, where records have one, gold objects."""
    answers = [parse_json(p) for p in predicted]
    validator = validator_for(schema)(schema)
    with_gold = [i for i, g in enumerate(gold) if g is not None]
    n = len(target)
    return {
        "n": n,
        "parsed": rate(sum(a is not MALFORMED for a in answers), n),
        "schema_validity": rate(sum(a is not MALFORMED and validator.is_valid(a)
                                    for a in answers), n),
        "agreement": rate(sum(_same(a, t) for a, t in zip(answers, target)), n),
        "fields": field_scores(answers, target),
        "gold_n": len(with_gold),
        "accuracy": rate(sum(_same(answers[i], gold[i]) for i in with_gold), len(with_gold)),
        "gold_fields": (field_scores([answers[i] for i in with_gold], [gold[i] for i in with_gold])
                        if with_gold else None),
    }


# ---------------------------------------------------------------------------- agent


def calls_of(message: dict | None) -> list[tuple[Any, Any]]:
    """An assistant message's tool calls as (name, parsed arguments or MALFORMED)."""
    out = []
    for call in (message or {}).get("tool_calls") or ():
        function = call.get("function") or {}
        arguments = function.get("arguments")
        out.append((function.get("name"), {} if arguments is None else parse_json(arguments)))
    return out


def token_f1(reference: str | None, answer: str | None) -> float:
    """SQuAD-style token overlap of two texts (folded, split into word tokens)."""
    want = Counter(re.findall(r"\w+", fold(reference or "")))
    got = Counter(re.findall(r"\w+", fold(answer or "")))
    if not want or not got:
        return float(want == got)
    common = sum((want & got).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def _argument_triples(calls: list[tuple[Any, Any]]) -> Counter:
    """(tool, path, canonical value) for every leaf of every parsed call's arguments."""
    triples: Counter = Counter()
    for name, arguments in calls:
        if arguments is not MALFORMED:
            for (path, value), n in leaves(arguments).items():
                triples[(name, path, value)] += n
    return triples


@dataclass(frozen=True)
class Turn:
    """One agent prediction point, scored against the teacher's assistant turn."""

    tools: tuple[str, ...]      # the teacher's called tool names in order; () for a text answer
    decided: bool               # the student called a tool exactly when the teacher did
    named: bool                 # same tool names in the same order
    exact: bool                 # same calls in the same order, arguments canonically equal
    argument_hits: int
    argument_predicted: int
    argument_true: int
    calls: int                  # the student's calls ...
    valid_calls: int            # ... whose arguments validate against the offered tool's schema
    text_f1: float | None       # token F1 of the content, for a teacher's text answer

    @property
    def agrees(self) -> bool:
        """Agreement for the cascade: the same calls, or a text answer where the teacher gave
        one (text cannot be matched exactly, so the decision is what counts)."""
        return self.exact if self.tools else self.decided


def score_turn(predicted: dict | None, target: dict, tools: Sequence[dict]) -> Turn:
    """The student's assistant message (None when it produced nothing) against the teacher's,
    with the tools offered at that point (a call to any other tool is invalid)."""
    want, got = calls_of(target), calls_of(predicted)
    exact = len(want) == len(got) and all(wn == gn and _same(ga, wa)
                                          for (wn, wa), (gn, ga) in zip(want, got))
    want_args, got_args = _argument_triples(want), _argument_triples(got)
    return Turn(
        tools=tuple(name for name, _ in want),
        decided=bool(want) == bool(got),
        named=[n for n, _ in want] == [n for n, _ in got],
        exact=exact,
        argument_hits=sum((want_args & got_args).values()),
        argument_predicted=sum(got_args.values()),
        argument_true=sum(want_args.values()),
        calls=len(got),
        valid_calls=sum(_valid_call(name, arguments, tools) for name, arguments in got),
        text_f1=None if want else token_f1(target.get("content"), (predicted or {}).get("content")),
    )


def turn_agrees(predicted: dict | None, target: dict) -> bool:
    return score_turn(predicted, target, ()).agrees


def _valid_call(name: Any, arguments: Any, tools: Sequence[dict]) -> bool:
    schema = next((t["parameters"] for t in tools if t["name"] == name), None)
    return (schema is not None and arguments is not MALFORMED
            and validator_for(schema)(schema).is_valid(arguments))


def summarize_turns(turns: Sequence[Turn]) -> dict:
    """Call and text metrics over scored turns. Tool-name accuracy and call exact match are over
    the turns where the teacher called; action accuracy is tool-name accuracy over every turn
    with "no call" as one more class; argument F1 is micro over all turns' triples, so a missed
    call costs recall and a spurious one precision; schema validity is over the student's calls."""
    called = [t for t in turns if t.tools]
    texts = [t for t in turns if not t.tools]
    student_calls = sum(t.calls for t in turns)
    return {
        "n": len(turns),
        "agreement": rate(sum(t.agrees for t in turns), len(turns)),
        "call_decision_accuracy": rate(sum(t.decided for t in turns), len(turns)),
        "missed_calls": sum(not t.decided for t in called),
        "spurious_calls": sum(not t.decided for t in texts),
        "call_turns": len(called),
        "tool_name_accuracy": rate(sum(t.named for t in called), len(called)),
        "action_accuracy": rate(sum(t.named for t in turns), len(turns)),
        "call_exact_match": rate(sum(t.exact for t in called), len(called)),
        "arguments": prf(sum(t.argument_hits for t in turns),
                         sum(t.argument_predicted for t in turns),
                         sum(t.argument_true for t in turns)),
        "student_calls": student_calls,
        "schema_validity": rate(sum(t.valid_calls for t in turns), student_calls),
        "text_turns": len(texts),
        "text_token_f1": _mean([t.text_f1 for t in texts]),
    }


def agent_report(predicted: Sequence[dict | None], target: Sequence[dict],
                 tools: Sequence[Sequence[dict]], depth: Sequence[int]) -> dict:
    """An agent student's assistant messages against the teacher's, per prediction point with the
    tools offered there and its depth: the summary overall, per tool the teacher called (a turn
    calling two tools counts under both) and per depth."""
    turns = [score_turn(p, t, offered) for p, t, offered in zip(predicted, target, tools)]
    by_tool: dict[str, list[Turn]] = {}
    by_depth: dict[int, list[Turn]] = {}
    for turn, d in zip(turns, depth):
        for name in dict.fromkeys(turn.tools):
            by_tool.setdefault(str(name), []).append(turn)
        by_depth.setdefault(d, []).append(turn)
    return {
        **summarize_turns(turns),
        "per_tool": {name: summarize_turns(group) for name, group in sorted(by_tool.items())},
        "per_depth": {str(d): summarize_turns(group) for d, group in sorted(by_depth.items())},
    }
