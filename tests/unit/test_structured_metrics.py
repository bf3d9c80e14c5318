import json

import pytest

from distill_compiler.metrics.structured import (
    MALFORMED,
    agent_report,
    calls_of,
    canonical,
    extract_report,
    extraction_agrees,
    leaves,
    parse_json,
    score_turn,
    token_f1,
    turn_agrees,
)

WEATHER = {"name": "get_weather", "description": "Weather for a city.",
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string"}, "units": {"enum": ["c", "f"]}},
                          "required": ["city"]}}
BOOK = {"name": "book", "description": "Book a table.",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "date": {"type": "string"},
                                      "guests": {"type": "integer"}},
                       "required": ["city", "date"]}}
TOOLS = [WEATHER, BOOK]


def calls(*pairs) -> dict:
    """An assistant message calling each (name, arguments); arguments given as a string are sent
    as they are (to write malformed JSON), anything else is serialised."""
    return {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {
            "name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
        for name, args in pairs]}


def text(content) -> dict:
    return {"role": "assistant", "content": content}


# (teacher, student, depth); the figures below are counted by hand from these nine turns.
TURNS = [
    # 1 exact: key order, case and padding differ only; but "C" is not in the enum: invalid
    (calls(("get_weather", {"city": "Paris", "units": "c"})),
     calls(("get_weather", '{"units": "C", "city": " paris "}')), 0),
    # 2 right tool, one of three arguments wrong; 2.0 == 2 (and validates as an integer)
    (calls(("book", {"city": "Rome", "date": "2024-05-01", "guests": 2})),
     calls(("book", {"city": "Rome", "date": "2024-05-02", "guests": 2.0})), 1),
    # 3 wrong tool: no argument triple can match
    (calls(("get_weather", {"city": "Oslo"})),
     calls(("book", {"city": "Oslo", "date": "today"})), 0),
    # 4 missed call: the student answered in text
    (calls(("get_weather", {"city": "Lima"})), text("It is sunny in Lima."), 1),
    # 5 spurious call where the teacher answered in text
    (text("Booked it for you."), calls(("get_weather", {"city": "Kyiv"})), 1),
    # 6 both answer in text: token F1 4 common of 6 and 4 tokens = 0.8
    (text("Your table is booked for Friday"), text("your table is  booked"), 2),
    # 7 arguments that are not JSON
    (calls(("get_weather", {"city": "Nice"})), calls(("get_weather", '{"city": "Nice"')), 2),
    # 8 missing second call of a two-call turn
    (calls(("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})),
     calls(("get_weather", {"city": "A"})), 0),
    # 9 an extra call to a tool nobody offered
    (calls(("get_weather", {"city": "Bern"})),
     calls(("get_weather", {"city": "Bern"}), ("delete_all", {})), 0),
]


def report(turns=TURNS):
    return agent_report([s for _, s, _ in turns], [t for t, _, _ in turns],
                        [TOOLS] * len(turns), [d for _, _, d in turns])


# ---------------------------------------------------------------------------- normal form


def test_canonical_folds_strings_and_numbers_but_keeps_types_apart():
    assert canonical("  New\u00a0 YORK ") == canonical("new york")
    assert canonical({"n": 1, "x": [1.0, 2]}) == canonical({"x": [2, 1], "n": 1.0})
    assert canonical(True) != canonical(1)
    assert canonical("5") != canonical(5)
    assert canonical(None) != canonical("null")


def test_canonical_compares_arrays_as_multisets():
    assert canonical(["b", "a", "b"]) == canonical(["B", "b", "a"])
    assert canonical(["a", "b"]) != canonical(["a", "b", "b"])
    assert canonical([{"k": 1}, {"k": 2}]) == canonical([{"k": 2.0}, {"k": 1}])


def test_leaves_flatten_nested_objects_and_take_array_elements_whole():
    value = {"intent": "Book", "slots": {"city": "Paris", "when": {"day": "mon"}},
             "tags": ["a", "b", "a"], "spans": [{"type": "city", "value": "Paris"}]}
    assert leaves(value) == {
        ("intent", '"book"'): 1, ("slots.city", '"paris"'): 1, ("slots.when.day", '"mon"'): 1,
        ("tags[]", '"a"'): 2, ("tags[]", '"b"'): 1,
        ("spans[]", '{"type": "city", "value": "paris"}'): 1}
    assert leaves({"slots": {}, "tags": []}) == {}


def test_parse_json_marks_what_does_not_parse():
    assert parse_json('{"a": 1}') == {"a": 1}
    assert parse_json("{'a': 1}") is MALFORMED
    assert parse_json(None) is MALFORMED
    assert parse_json({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------------------- agent


def test_agent_report_overall_figures():
    r = report()
    assert r["n"] == 9
    assert r["call_decision_accuracy"] == pytest.approx(7 / 9)
    assert (r["missed_calls"], r["spurious_calls"]) == (1, 1)
    assert r["call_turns"] == 7
    assert r["tool_name_accuracy"] == pytest.approx(3 / 7)   # turns 1, 2, 7
    assert r["action_accuracy"] == pytest.approx(4 / 9)      # those and turn 6's text for text
    assert r["call_exact_match"] == pytest.approx(1 / 7)     # turn 1
    # triples: hits 2+2+0+0+0+0+0+1+1, predicted 2+3+2+0+1+0+0+1+1, true 2+3+1+1+0+0+1+2+1
    assert r["arguments"] == {"precision": pytest.approx(6 / 10), "recall": pytest.approx(6 / 11),
                              "f1": pytest.approx(12 / 21)}
    # eight student calls; turn 1's breaks the enum, turn 7's is not JSON, turn 9's delete_all
    # is unknown
    assert r["student_calls"] == 8
    assert r["schema_validity"] == pytest.approx(5 / 8)
    assert r["text_turns"] == 2
    assert r["text_token_f1"] == pytest.approx((0.0 + 0.8) / 2)
    assert r["agreement"] == pytest.approx(2 / 9)             # turn 1 exact, turn 6 text for text
    json.dumps(r)  # JSON-ready: string keys, no sentinels


def test_agent_report_per_tool_groups_by_the_teachers_tool():
    per_tool = report()["per_tool"]
    assert sorted(per_tool) == ["book", "get_weather"]
    weather = per_tool["get_weather"]  # turns 1, 3, 4, 7, 8, 9
    assert weather["n"] == 6 and weather["missed_calls"] == 1
    assert weather["tool_name_accuracy"] == pytest.approx(2 / 6)
    assert weather["call_exact_match"] == pytest.approx(1 / 6)
    assert weather["text_turns"] == 0 and weather["text_token_f1"] is None
    book = per_tool["book"]
    assert (book["n"], book["tool_name_accuracy"], book["call_exact_match"]) == (1, 1.0, 0.0)
    assert book["arguments"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                 "f1": pytest.approx(2 / 3)}


def test_agent_report_per_depth():
    per_depth = report()["per_depth"]
    assert list(per_depth) == ["0", "1", "2"]
    assert [per_depth[d]["n"] for d in per_depth] == [4, 3, 2]
    assert per_depth["1"]["call_decision_accuracy"] == pytest.approx(1 / 3)
    deep = per_depth["2"]  # turn 6 (text, agrees) and turn 7 (arguments not JSON)
    assert deep["agreement"] == 0.5 and deep["call_decision_accuracy"] == 1.0
    assert (deep["tool_name_accuracy"], deep["call_exact_match"]) == (1.0, 0.0)
    assert deep["arguments"] == {"precision": None, "recall": 0.0, "f1": 0.0}
    assert (deep["student_calls"], deep["schema_validity"]) == (1, 0.0)
    assert deep["text_token_f1"] == pytest.approx(0.8)


def test_a_call_to_a_tool_not_offered_at_that_point_is_invalid():
    teacher = calls(("get_weather", {"city": "Oslo"}))
    student = calls(("book", {"city": "Oslo", "date": "today"}))
    assert score_turn(student, teacher, [WEATHER]).valid_calls == 0
    assert score_turn(student, teacher, [WEATHER, BOOK]).valid_calls == 1


def test_argument_values_that_break_the_schema_are_invalid_but_still_scored():
    teacher = calls(("get_weather", {"city": "Oslo", "units": "c"}))
    turn = score_turn(calls(("get_weather", {"city": "Oslo", "units": "kelvin"})), teacher, TOOLS)
    assert turn.valid_calls == 0 and turn.named and not turn.exact
    assert (turn.argument_hits, turn.argument_predicted, turn.argument_true) == (1, 2, 2)


def test_malformed_student_messages_score_as_wrong_without_raising():
    teacher = calls(("get_weather", {"city": "Oslo"}))
    for student in (None, text(None), {"role": "assistant", "tool_calls": [{"function": {}}]}):
        turn = score_turn(student, teacher, TOOLS)
        assert not turn.exact and turn.valid_calls == 0
    assert calls_of({"tool_calls": [{"function": {"name": "f", "arguments": None}}]}) == [("f", {})]
    assert calls_of({"tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}) \
        == [("f", {"a": 1})]


def test_turn_agreement_for_the_cascade():
    assert turn_agrees(TURNS[0][1], TURNS[0][0])
    assert not turn_agrees(TURNS[1][1], TURNS[1][0])
    assert turn_agrees(text("anything"), text("something else"))
    assert not turn_agrees(None, calls(("get_weather", {"city": "Oslo"})))


def test_token_f1():
    assert token_f1("Your table is booked for Friday", "your table is booked") == pytest.approx(0.8)
    assert token_f1("done", "Done.") == 1.0
    assert token_f1("done", None) == 0.0
    assert token_f1("", None) == 1.0


def test_agent_report_on_no_points():
    r = agent_report([], [], [], [])
    assert r["n"] == 0 and r["agreement"] is None and r["tool_name_accuracy"] is None
    assert r["arguments"] == {"precision": None, "recall": None, "f1": None}
    assert r["schema_validity"] is None and r["text_token_f1"] is None
    assert r["per_tool"] == {} and r["per_depth"] == {}


# ---------------------------------------------------------------------------- extract

SCHEMA = {"type": "object",
          "properties": {"intent": {"enum": ["book", "weather"]},
                         "slots": {"type": "object",
                                   "properties": {"city": {"type": "string"},
                                                  "day": {"type": "string"}},
                                   "additionalProperties": False},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["intent", "slots"]}
TARGETS = [
    {"intent": "book", "slots": {"city": "Paris", "day": "mon"}, "tags": ["x", "y", "x"]},
    {"intent": "weather", "slots": {"city": "Oslo"}, "tags": ["x"]},
    {"intent": "book", "slots": {}},
    {"intent": "book", "slots": {"city": "Rome"}},
    {"intent": "weather", "slots": {}},
]
PREDICTED = [
    '{"slots": {"day": "Mon", "city": "paris"}, "intent": "book", "tags": ["y", "x", "x"]}',
    '{"intent": "weather", "slots": {"city": "Bergen", "day": "tue"}, "tags": ["x", "x"]}',
    "intent: book",
    '{"intent": "book", "slots": {"city": "Rome", "zip": 5}}',  # zip breaks additionalProperties
    None,
]
GOLD = [None, {"intent": "weather", "slots": {"city": "Bergen", "day": "tue"}, "tags": ["x", "x"]},
        None, {"intent": "book", "slots": {"city": "Rome"}}, None]


def test_extract_report_against_the_teacher():
    r = extract_report(PREDICTED, TARGETS, [None] * 5, SCHEMA)
    assert r["n"] == 5
    assert r["parsed"] == pytest.approx(3 / 5)
    assert r["schema_validity"] == pytest.approx(2 / 5)
    assert r["agreement"] == pytest.approx(1 / 5)
    fields = r["fields"]
    # leaves: hits 6+2+0+2+0, predicted 6+5+0+3+0, true 6+3+1+2+1
    assert fields["precision"] == pytest.approx(10 / 14)
    assert fields["recall"] == pytest.approx(10 / 13)
    assert fields["f1"] == pytest.approx(20 / 27)
    per_field = fields["per_field"]
    assert per_field["intent"] == {"precision": 1.0, "recall": 0.6, "f1": pytest.approx(0.75),
                                   "support": 5}
    assert per_field["slots.city"] == {"precision": pytest.approx(2 / 3),
                                       "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3),
                                       "support": 3}
    assert per_field["slots.day"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                      "support": 1}
    assert per_field["slots.zip"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    assert per_field["tags[]"] == {"precision": 0.8, "recall": 1.0, "f1": pytest.approx(8 / 9),
                                   "support": 4}
    assert r["gold_n"] == 0 and r["accuracy"] is None and r["gold_fields"] is None
    json.dumps(r)


def test_extract_report_against_gold_where_records_have_it():
    r = extract_report(PREDICTED, TARGETS, GOLD, SCHEMA)
    assert r["gold_n"] == 2
    assert r["accuracy"] == 0.5  # record 2 equals its gold, record 4 adds a zip
    assert r["gold_fields"]["precision"] == pytest.approx(7 / 8)
    assert r["gold_fields"]["recall"] == 1.0
    assert r["agreement"] == pytest.approx(1 / 5)  # gold leaves the teacher figures alone


def test_extraction_agreement_for_the_cascade():
    assert extraction_agrees(PREDICTED[0], TARGETS[0])
    assert not extraction_agrees(PREDICTED[1], TARGETS[1])
    assert not extraction_agrees(None, TARGETS[4])
    assert not extraction_agrees("{", TARGETS[4])


def test_extract_report_on_no_records():
    r = extract_report([], [], [], SCHEMA)
    assert r["n"] == 0 and r["parsed"] is None and r["agreement"] is None
    assert r["fields"] == {"precision": None, "recall": None, "f1": None, "per_field": {}}
