"""`distill run BUNDLE --batch requests.jsonl`: offline scoring of a file of requests, for a
classify bundle (the bag-of-words bundle of test_runtime) and an agent and an extract bundle
(the tiny exported decoder)."""

from __future__ import annotations

import json

import jsonschema
from cli_runner import cli
from test_runtime import policy, write_bundle
from tiny_causal import EXTRACT_SCHEMA, TOOLS, write_causal_bundle

NO_TEACHER = {"model": None, "api_base": None, "api_key_env": None}


def answers(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classify_batch_answers_every_line_in_order(tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle", policy())
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"message": "charged twice"}\n\n{"message": "my login password"}\n'
                        '{not json\n{"msg": "wrong field"}\n{"message": "help contract"}\n')
    out = tmp_path / "answers.jsonl"
    assert cli("run", bundle, "--batch", requests, "-o", out) == 1  # two lines were not requests
    rows = answers(out)
    assert [r["line"] for r in rows] == [1, 3, 4, 5, 6]
    assert [r.get("label") for r in rows] == ["billing", "password_reset", None, None,
                                              "legal_advice"]
    assert rows[2]["error"].startswith("not valid JSON")
    assert "'message' is a required property" in rows[3]["error"]
    assert rows[4]["route"] == "refusal"
    summary = capsys.readouterr().err
    assert "answered 3 requests" in summary and "2 invalid lines" in summary


def test_batch_writes_to_stdout_and_exits_0_when_every_line_answers(tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle", policy())
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"message": f"charged twice {i}"}) + "\n"
                                for i in range(40)))  # more than one chunk of 32
    capsys.readouterr()
    assert cli("run", bundle, "--batch", requests) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 41))


def test_agent_and_extract_batches(tmp_path, exported_causal):
    agent = write_causal_bundle(tmp_path / "agent", exported_causal, "agent", NO_TEACHER)
    extract = write_causal_bundle(tmp_path / "extract", exported_causal, "extract", NO_TEACHER)
    (tmp_path / "agent.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "where is order A15"}]}) + "\n" +
        json.dumps({"messages": [{"role": "user", "content": "cancel A12"}],
                    "tools": ["cancel_order"], "tool_choice": "required"}) + "\n")
    (tmp_path / "extract.jsonl").write_text('{"message": "my order A21 came broken"}\n')
    assert cli("run", agent, "--batch", tmp_path / "agent.jsonl", "-o", tmp_path / "a.out") == 0
    assert cli("run", extract, "--batch", tmp_path / "extract.jsonl", "-o",
               tmp_path / "e.out") == 0
    params = {t["name"]: t["parameters"] for t in TOOLS}
    first, second = answers(tmp_path / "a.out")
    for row, name in ((first, "get_order"), (second, "cancel_order")):
        [call] = row["output"]["tool_calls"]
        assert call["function"]["name"] == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])
    [extracted] = answers(tmp_path / "e.out")
    jsonschema.validate(extracted["output"], EXTRACT_SCHEMA)
