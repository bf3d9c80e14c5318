"""The real-data benchmarks' converters: SGD dialogues into agent teacher logs, SNIPS queries into
extraction rows. Inline samples are shaped like the real files; the last test of each dataset
converts the start of the real one when ../shared/datasets has it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from distill_compiler.runtime.chat_format import ChatFormat
from distill_compiler.runtime.enforceable import check_schema
from distill_compiler.spec.load import load_spec
from distill_compiler.stages.curate import Validator
from distill_compiler.students.causal.data import points
from distill_compiler.teacher.logs import LogReader

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: harness beside it
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sgd = load_benchmark("sgd_agent")
snips = load_benchmark("snips_extract")


# ============================================================================ SGD

def slot(name, categorical=False, values=()):
    return {"name": name, "description": f"The {name.replace('_', ' ')}",
            "is_categorical": categorical, "possible_values": list(values)}


RESTAURANTS_1 = {
    "service_name": "Restaurants_1", "description": "Restaurant search and reservations",
    "slots": [slot("restaurant_name"), slot("city"), slot("time"),
              slot("cuisine", values=["Mexican", "Italian"]),  # a sample, not a closed set
              slot("party_size", True, ["1", "2", "3", "4"]),
              slot("price_range", True, ["inexpensive", "moderate", "expensive"])],
    "intents": [
        {"name": "FindRestaurants", "description": "Find a restaurant in a city",
         "is_transactional": False, "required_slots": ["cuisine", "city"],
         "optional_slots": {"price_range": "dontcare"}, "result_slots": ["restaurant_name"]},
        {"name": "ReserveRestaurant", "description": "Reserve a table at a restaurant",
         "is_transactional": True, "required_slots": ["restaurant_name", "city", "time"],
         "optional_slots": {"party_size": "2"}, "result_slots": ["restaurant_name"]}],
}
# Same intent name, other service and slots: why tool names carry the service.
RESTAURANTS_2 = {
    "service_name": "Restaurants_2", "description": "Another restaurant service",
    "slots": [slot("location"), slot("category")],
    "intents": [{"name": "FindRestaurants", "description": "Search restaurants",
                 "is_transactional": False, "required_slots": ["location", "category"],
                 "optional_slots": {}, "result_slots": []}],
}
RESULTS = [{"restaurant_name": f"Pasta Place {i}", "city": "San Jose"} for i in range(3)]


def turn(speaker, utterance, call=None, results=()):
    frame = {"service": "Restaurants_1", "slots": [], "actions": []}
    if call:
        frame.update(service_call={"method": call[0], "parameters": call[1]},
                     service_results=list(results))
    return {"speaker": speaker, "utterance": utterance, "frames": [frame]}


DIALOGUE = {"dialogue_id": "1_00000", "services": ["Restaurants_1"], "turns": [
    turn("USER", "Find me an Italian place in San Jose."),
    turn("SYSTEM", "Any price range?"),
    turn("USER", "No, any is fine."),
    turn("SYSTEM", "Pasta Place 0 is nice.",
         ("FindRestaurants", {"city": "San Jose", "cuisine": "Italian"}), RESULTS),
    turn("USER", "Book it for 2 at 7 pm."),
    turn("SYSTEM", "A table for 2 at 7 pm, right?"),
    turn("USER", "Yes."),
    turn("SYSTEM", "Booked.", ("ReserveRestaurant", {"restaurant_name": "Pasta Place 0",
                                                     "city": "San Jose", "time": "19:00",
                                                     "party_size": "2"}), RESULTS[:1]),
    turn("USER", "Thanks, bye."),
    turn("SYSTEM", "Goodbye."),
]}
SERVICES = {"Restaurants_1": RESTAURANTS_1, "Restaurants_2": RESTAURANTS_2}


def lines(context_turns=0, max_results=0):
    return sgd.convert([DIALOGUE], SERVICES, context_turns, max_results)


def call_of(message):
    (call,) = message["tool_calls"]
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def test_each_intent_becomes_an_enforceable_tool_named_by_service():
    tools = [t["function"] for s in SERVICES.values() for t in sgd.service_tools(s)]
    assert [t["name"] for t in tools] == ["Restaurants_1__FindRestaurants",
                                          "Restaurants_1__ReserveRestaurant",
                                          "Restaurants_2__FindRestaurants"]
    find = tools[0]
    assert find["description"] == "Find a restaurant in a city"
    params = find["parameters"]
    assert list(params["properties"]) == ["cuisine", "city", "price_range"]
    assert params["required"] == ["cuisine", "city"]
    assert params["properties"]["price_range"]["enum"] == ["inexpensive", "moderate", "expensive"]
    assert "enum" not in params["properties"]["cuisine"]  # its values are only examples
    for tool in tools:
        assert check_schema(tool["parameters"]) == []
    validator = jsonschema.Draft202012Validator(params)
    assert validator.is_valid({"cuisine": "Thai", "city": "Paris"})
    assert not validator.is_valid({"cuisine": "Thai"})  # required slot missing
    assert not validator.is_valid({"cuisine": "Thai", "city": "Paris", "price_range": "cheap"})
    assert not validator.is_valid({"cuisine": "Thai", "city": "Paris", "rating": "5"})
    bare = sgd.tool_parameters(RESTAURANTS_1, RESTAURANTS_1["intents"][0], slot_descriptions=False)
    assert all("description" not in p for p in bare["properties"].values())


def test_each_service_call_becomes_a_log_line_with_the_dialogues_tools():
    first, second = lines()
    assert [m["role"] for m in first["request"]["messages"]] == ["user", "assistant", "user"]
    assert first["request"]["messages"][1] == {"role": "assistant", "content": "Any price range?"}
    assert [t["function"]["name"] for t in first["request"]["tools"]] == [
        "Restaurants_1__FindRestaurants", "Restaurants_1__ReserveRestaurant"]
    target = first["response"]["choices"][0]["message"]
    assert target["content"] is None
    assert call_of(target) == ("Restaurants_1__FindRestaurants",
                               {"city": "San Jose", "cuisine": "Italian"})
    assert call_of(second["response"]["choices"][0]["message"])[0] == \
        "Restaurants_1__ReserveRestaurant"
    assert [line["meta"]["depth"] for line in (first, second)] == [0, 1]
    assert first["meta"] == {"dialogue_id": "1_00000", "service": "Restaurants_1", "depth": 0,
                             "kind": "call"}


def test_replies_add_the_turns_that_call_nothing_and_leave_the_calls_as_they_were():
    both = sgd.convert([DIALOGUE], SERVICES, 0, 0, replies=True)
    replies = [line for line in both if line["meta"]["kind"] == "reply"]
    assert [r["response"]["choices"][0]["message"] for r in replies] == [
        {"role": "assistant", "content": text}
        for text in ("Any price range?", "A table for 2 at 7 pm, right?", "Goodbye.")]
    assert [r["meta"]["depth"] for r in replies] == [0, 1, 2]  # calls made before each
    assert [r["request"]["messages"][-1]["content"] for r in replies] == [
        "Find me an Italian place in San Jose.", "Book it for 2 at 7 pm.", "Thanks, bye."]
    assert [line for line in both if line["meta"]["kind"] == "call"] == lines()


def test_an_earlier_call_is_a_tool_call_then_its_results_then_the_reply():
    messages = lines()[1]["request"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "tool",
                                             "assistant", "user", "assistant", "user"]
    call, result, reply = messages[3:6]
    assert call_of(call) == ("Restaurants_1__FindRestaurants",
                             {"city": "San Jose", "cuisine": "Italian"})
    assert result["tool_call_id"] == call["tool_calls"][0]["id"] == "call_0"
    assert json.loads(result["content"]) == RESULTS
    assert reply == {"role": "assistant", "content": "Pasta Place 0 is nice."}
    assert lines()[1]["response"]["choices"][0]["message"]["tool_calls"][0]["id"] == "call_1"


def test_context_keeps_the_last_turns_from_a_user_turn_and_the_first_results():
    # The second call is turn 7: three turns back is turn 4 (user); four back is turn 3, a
    # system turn, so the context still opens on turn 4.
    for k in (3, 4):
        messages = lines(context_turns=k)[1]["request"]["messages"]
        assert [m["content"] for m in messages] == [
            "Book it for 2 at 7 pm.", "A table for 2 at 7 pm, right?", "Yes."]
    messages = lines(context_turns=5)[1]["request"]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user",
                                             "assistant", "user"]
    assert json.loads(messages[2]["content"]) == RESULTS[:3]
    capped = lines(context_turns=5, max_results=1)[1]["request"]["messages"]
    assert json.loads(capped[2]["content"]) == RESULTS[:1]


@pytest.fixture
def sgd_spec(tmp_path):
    """The benchmark's spec over the sample services, with the sample dialogue as its log."""
    log = sgd.write_jsonl(tmp_path / "train.jsonl", lines())
    tools = [t for s in SERVICES.values() for t in sgd.service_tools(s)]
    return load_spec(sgd.write_spec(tmp_path, sgd.spec_document(tools, log, "scratch:2x64"))), log


def test_log_lines_replay_as_valid_traces_offering_only_their_tools(sgd_spec):
    spec, log = sgd_spec
    assert [t.name for t in spec.tools][-1] == "Restaurants_2__FindRestaurants"
    records = LogReader(spec, log.parent).replay((log.name,))
    assert len(records) == 2
    offered = ["Restaurants_1__FindRestaurants", "Restaurants_1__ReserveRestaurant"]
    validator = Validator(spec)
    for record in records:
        assert record["input"] == {"tools": offered}
        assert validator.problem(record) is None
    point = points(records[1], spec, ChatFormat())[-1]
    assert [t["name"] for t in point.tools] == offered
    assert point.prompt[-1] == {"role": "user", "content": "Yes."}
    # Arguments in the tool's schema order, as constrained decoding emits them.
    assert point.target["tool_calls"][0]["function"]["arguments"] == (
        '{"restaurant_name": "Pasta Place 0", "city": "San Jose", "time": "19:00", '
        '"party_size": "2"}')


def test_a_whole_dialogue_is_one_trace_training_every_system_turn(sgd_spec):
    spec, log = sgd_spec
    (line,) = sgd.whole_dialogues([DIALOGUE], SERVICES, max_results=0)
    assert sgd.calls_in(line) == 2
    assert line["response"]["choices"][0]["message"] == {"role": "assistant", "content": "Goodbye."}
    # The last reply line with whole contexts: every line of the dialogue is a prefix of it.
    assert line == sgd.convert([DIALOGUE], SERVICES, 0, 0, replies=True)[-1]
    sgd.write_jsonl(log, [line])
    (record,) = LogReader(spec, log.parent).replay((log.name,))
    found = points(record, spec, ChatFormat())
    # Each SYSTEM turn is a point: a reply, a call then its reply after the results, ...
    assert [p.target.get("content") or call_of(p.target)[0] for p in found] == [
        "Any price range?", "Restaurants_1__FindRestaurants", "Pasta Place 0 is nice.",
        "A table for 2 at 7 pm, right?", "Restaurants_1__ReserveRestaurant", "Booked.",
        "Goodbye."]


def test_a_call_missing_a_required_slot_is_what_curate_drops(sgd_spec):
    spec, log = sgd_spec
    record = LogReader(spec, log.parent).replay((log.name,))[0]
    call = record["messages"][-1]["tool_calls"][0]["function"]
    call["arguments"] = json.dumps({"city": "San Jose"})
    assert Validator(spec).problem(record)[0] == "tool_arguments"


def test_method_accuracy_ignores_the_service_and_call_report_scores_depths(sgd_spec):
    spec, log = sgd_spec
    chat = ChatFormat()
    found = sgd.call_points(spec, chat, log, lines())
    assert [p.target["tool_calls"][0]["function"]["name"] for p in found] == [
        "Restaurants_1__FindRestaurants", "Restaurants_1__ReserveRestaurant"]
    right = found[0].target
    other_service = sgd.call_message("c", "Restaurants_2__FindRestaurants",
                                     {"location": "San Jose", "category": "Italian"})
    assert sgd.method_accuracy([other_service], [right]) == 1.0
    assert sgd.method_accuracy([right], [found[1].target]) == 0.0
    assert sgd.method_accuracy([None], [right]) == 0.0
    report = sgd.call_report(found, [SimpleNamespace(message=right),
                                     SimpleNamespace(message={"role": "assistant",
                                                              "content": "Booked."})], [0, 1])
    assert report["method_accuracy"] == 0.5
    assert report["tool_name_accuracy"] == 0.5
    assert report["call_exact_match"] == 0.5
    assert report["per_depth"]["0"]["call_exact_match"] == 1.0
    assert report["per_depth"]["1"]["missed_calls"] == 1


def test_dev_cascade_applies_the_bundles_threshold_and_splits_by_service(sgd_spec, tmp_path):
    spec, log = sgd_spec
    found = sgd.call_points(spec, ChatFormat(), log, lines())
    policy = {"format": 1, "task": "agent", "chat": ChatFormat().to_dict(), "max_new_tokens": 96,
              "threshold": 0.5}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    sure = SimpleNamespace(message=found[0].target, confidence=0.9, truncated=False)
    unsure = SimpleNamespace(message=found[1].target, confidence=0.2, truncated=False)
    cascade = sgd.cascade_on_dev(tmp_path, found, [sure, unsure])
    assert (cascade["escalation_rate"], cascade["accepted_agreement"]) == (0.5, 1.0)
    assert cascade["rules"] == {"confident": 1, "low_confidence": 1}
    kept = sgd.subset(found, [sure, unsure], [0, 1], [False, True])
    assert kept == ([found[1]], [unsure], [1])


def test_sample_is_seeded_and_keeps_order():
    items = list(range(100))
    picked = sgd.sample(items, 10, seed=0)
    assert picked == sorted(picked) and len(picked) == 10
    assert picked == sgd.sample(items, 10, seed=0) != sgd.sample(items, 10, seed=1)
    assert sgd.sample(items, 0, seed=0) == items


@pytest.mark.skipif(not sgd.DATA.is_dir(), reason="../shared/datasets/sgd is not here")
def test_real_sgd_dialogues_convert_and_validate(tmp_path):
    services = sgd.read_schemas([sgd.DATA / "train" / "schema.json", sgd.DATA / "dev" / "schema.json"])
    tools = [t for s in services.values() for t in sgd.service_tools(s)]
    names = [t["function"]["name"] for t in tools]
    assert len(names) == len(set(names))
    assert all(check_schema(t["function"]["parameters"]) == [] for t in tools)
    log_lines = []
    for split in ("train", "dev"):
        dialogues = sgd.read_dialogues(split)[:5]
        converted = sgd.convert(dialogues, services, context_turns=4, max_results=1)
        calls = sum("service_call" in f for d in dialogues for t in d["turns"] for f in t["frames"])
        assert len(converted) == calls > 0
        log_lines += converted
    log = sgd.write_jsonl(tmp_path / "train.jsonl", log_lines)
    spec = load_spec(sgd.write_spec(tmp_path, sgd.spec_document(tools, log, "scratch:4x256")))
    validator = Validator(spec)
    for record in LogReader(spec, tmp_path).replay((log.name,)):
        assert validator.problem(record) is None
        assert record["messages"][0]["role"] == "user"
        assert points(record, spec, ChatFormat())[-1].target["tool_calls"]


# ============================================================================ SNIPS

def chunks(*parts):
    """A query's `data` as SNIPS writes it: a string is plain text, a (text, entity) pair a
    labelled span."""
    return [{"text": p} if isinstance(p, str) else {"text": p[0], "entity": p[1]} for p in parts]


ROW = chunks("Book a table at a ", ("bar", "restaurant_type"), " or ", ("pub ", "restaurant_type"),
             " in ", ("Boston", "city"), " ")
SCHEMA = snips.output_schema(["BookRestaurant", "PlayMusic"],
                             ["restaurant_type", "city", "artist"])


def test_a_query_becomes_its_text_intent_and_slots():
    text, output = snips.example("BookRestaurant", ROW)
    assert text == "Book a table at a bar or pub  in Boston"
    assert output == {"intent": "BookRestaurant",
                      "slots": {"restaurant_type": "bar | pub", "city": "Boston"}}
    assert snips.example("PlayMusic", chunks("play some jazz")) == (
        "play some jazz", {"intent": "PlayMusic", "slots": {}})


def test_decode_repairs_split_surrogate_emoji_and_keeps_accents():
    pizza = b"\xed\xa0\xbc\xed\xbd\x95"  # U+1F355 as two separately encoded surrogates
    raw = '{"text": "M\u00fasica '.encode() + pizza + b'"}'
    assert json.loads(snips.decode(raw)) == {"text": "M\u00fasica \U0001F355"}
    assert snips.decode("M\u00fasica".encode()) == "M\u00fasica"
    assert snips.decode(b"caf\xe9 \xff") == "caf\u00e9 \u00ff"  # not UTF-8 at all: latin-1


def test_output_schema_is_enforceable_with_every_slot_an_optional_string():
    assert check_schema(SCHEMA) == []
    assert list(SCHEMA["properties"]["slots"]["properties"]) == ["artist", "city", "restaurant_type"]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    assert validator.is_valid(snips.example("BookRestaurant", ROW)[1])
    assert validator.is_valid({"intent": "PlayMusic", "slots": {}})
    for wrong in ({"intent": "GetWeather", "slots": {}},
                  {"intent": "PlayMusic", "slots": {"year": "1990"}},
                  {"intent": "PlayMusic", "slots": {"artist": 5}},
                  {"intent": "PlayMusic", "slots": {"artist": ["Nina Simone"]}},
                  {"intent": "PlayMusic"}):
        assert not validator.is_valid(wrong), wrong


def test_validate_loses_the_queries_train_also_has():
    train = [("Play some Jazz", {}), ("rate this book", {})]
    validate = [("play  some jazz ", {}), ("Rate this novel", {})]
    assert snips.unseen(validate, train) == [("Rate this novel", {})]


def test_per_intent_sample_takes_n_of_each_in_order():
    examples = [(f"q{i}", {"intent": "A" if i % 3 else "B", "slots": {}}) for i in range(30)]
    picked = snips.per_intent_sample(examples, 4, seed=0)
    assert [o["intent"] for _, o in picked].count("A") == 4
    assert [o["intent"] for _, o in picked].count("B") == 4
    assert picked == sorted(picked, key=lambda e: int(e[0][1:]))
    assert snips.per_intent_sample(examples, 0, seed=0) == examples


def test_extraction_metrics_score_intents_slot_pairs_and_validity():
    targets = [{"intent": "BookRestaurant", "slots": {"restaurant_type": "bar | pub",
                                                      "city": "Boston"}},
               {"intent": "PlayMusic", "slots": {"artist": "Miles Davis"}},
               {"intent": "PlayMusic", "slots": {"artist": "Nina Simone"}},
               {"intent": "PlayMusic", "slots": {}}]
    predicted = [
        # Same pairs in another order and case: an exact match.
        json.dumps({"intent": "BookRestaurant", "slots": {"city": "boston",
                                                          "restaurant_type": "pub | bar"}}),
        json.dumps({"intent": "PlayMusic", "slots": {"artist": "Miles Davis"}}),
        # Right slot, wrong intent, and a spurious slot the schema does not know.
        json.dumps({"intent": "GetWeather", "slots": {"artist": "Nina Simone", "year": "1990"}}),
        "not JSON",
    ]
    m = snips.extraction_metrics(predicted, targets, SCHEMA)
    assert m["n"] == 4
    assert m["intent_accuracy"] == 0.5
    assert m["exact_match"] == 0.5
    # 5 reference pairs, 6 predicted, 5 right.
    assert m["slots"]["precision"] == pytest.approx(5 / 6)
    assert m["slots"]["recall"] == 1.0
    assert m["per_slot"]["year"]["precision"] == 0.0
    assert m["per_slot"]["restaurant_type"]["support"] == 2
    assert m["parsed"] == 0.75
    assert m["schema_validity"] == 0.5


def test_rows_replay_as_valid_extract_records(tmp_path):
    text, output = snips.example("BookRestaurant", ROW)
    log = snips.write_jsonl(tmp_path / "train.jsonl", snips.log_rows([(text, output)]))
    spec = load_spec(snips.write_spec(tmp_path, snips.spec_document(SCHEMA, log, "scratch:2x64")))
    assert "&id" not in (tmp_path / "spec.yaml").read_text()  # no YAML anchors
    (record,) = LogReader(spec, tmp_path).replay((log.name,))
    assert record["input"] == {"message": text}
    assert record["target"] == output
    assert Validator(spec).problem(record) is None
    (point,) = points(record, spec, ChatFormat())
    assert point.prompt[-1] == {"role": "user", "content": text}
    assert json.loads(point.target["content"]) == output


@pytest.mark.skipif(not snips.DATA.is_dir(), reason="../shared/datasets/snips is not here")
def test_real_snips_queries_convert_and_validate():
    assert len(snips.intents()) == 7
    train = snips.read_split("train_full")
    validate = snips.unseen(snips.read_split("validate"), train)
    schema = snips.output_schema(snips.intents(), snips.slot_types(train))
    assert check_schema(schema) == []
    assert len(schema["properties"]["slots"]["properties"]) == 39
    validator = jsonschema.Draft202012Validator(schema)
    assert all(validator.is_valid(output) for _, output in train + validate)
    assert {o["intent"] for _, o in validate} == set(snips.intents())
    texts = " ".join(text for text, _ in train)
    assert "M\u00fasica" in texts and "\u00c3" not in texts  # PlayMusic decoded, not garbled


# ============================================================================ machine facts

def test_the_cpu_line_names_the_model_and_its_int8_instructions():
    harness = load_benchmark("harness")
    vnni = harness.machine("model name\t: Intel(R) Xeon(R) Processor\n"
                           "flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8\n")
    assert vnni["cpu"] == "Intel(R) Xeon(R) Processor" and vnni["vnni"] and vnni["amx"]
    assert harness.cpu_line(vnni).endswith(" cores, int8: AVX2, AVX-512, VNNI, AMX")
    avx2 = harness.machine("model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n")
    assert avx2["int8"] == "AVX2" and not avx2["avx512"] and not avx2["vnni"]
    assert harness.machine("flags\t\t: sse4_2\n")["int8"] == "no AVX2"
