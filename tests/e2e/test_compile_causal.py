"""Full spec-to-bundle compiles of decoder students on CPU: an agent and an extractor trained
from scratch on recorded logs, exported with a KV cache and int8, evaluated through the
constrained runtime, bundled, and answered through `distill run` and load_bundle.
"""

import json
from pathlib import Path

import jsonschema
import pytest
from cli_runner import cli
from tiny_causal import EXTRACT_SCHEMA, RICH_TOOLS, TOOLS, agent_trace, extraction

pytestmark = pytest.mark.e2e

BUNDLE_FILES = {"model.onnx", "tokenizer.json", "policy.json", "manifest.json", "report.json",
                "MODEL_CARD.md", "report.html", "chat.json", "decoder.json"}
# Exact duplicates only: fixture messages differ in an order id, which MinHash calls near-equal.
TRAINING = ("data:\n  near_duplicate_threshold: 1.0\n"
            "student:\n  base: scratch:2x64\n  method: sft\n  epochs: 50\n  learning_rate: 0.01\n"
            "  batch_size: 8\n  max_length: 256\n  patience: 0\n"
            "export:\n  quantize: int8\n  max_new_tokens: 48\n  min_parity: 0.9\n")


# The extractor at 1e-2 sat on an edge: it learned on AVX2 CPUs and diverged on an AVX-512 VNNI
# one (test agreement 0.26; seed 1 failed its gates). At 3e-3 it reached 100 % agreement there
# (as with 5e-3 over 80 epochs): lower steps are far from where the float kernels matter.
EXTRACT_TRAINING = TRAINING.replace("learning_rate: 0.01", "learning_rate: 0.003")


def log_line(messages: list[dict], tools=TOOLS) -> str:
    *request, response = messages
    return json.dumps({"request": {"messages": request,
                                   "tools": [{"type": "function", "function": t} for t in tools]},
                       "response": {"choices": [{"message": response}]}})


def agent_spec(root: Path, tools=TOOLS, name: str = "tiny-agent") -> Path:
    # One log line per assistant turn, as production logs hold them.
    lines = []
    for i in range(60):
        trace = agent_trace(i)
        lines += [log_line(trace[:k + 1], tools) for k, m in enumerate(trace)
                  if m["role"] == "assistant"]
    (root / "log.jsonl").write_text("\n".join(lines) + "\n")
    tools = "".join(f"  - {json.dumps(t)}\n" for t in tools)
    (root / "spec.yaml").write_text(
        f"name: {name}\ntask: agent\ndescription: Fixture shop assistant.\n"
        f"tools:\n{tools}"
        "escalation:\n  triggers: [{pattern: '(?i)lawyer'}]\n  target_accuracy: 0.9\n"
        "teacher:\n  logs: [log.jsonl]\n" + TRAINING
        + "gates:\n  min_schema_validity: 1.0\n")
    return root / "spec.yaml"


def extract_spec(root: Path) -> Path:
    rows = [{"input": text, "output": target} for text, target in map(extraction, range(180))]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "spec.yaml").write_text(
        "name: tiny-extract\ntask: extract\ndescription: Read order problems.\n"
        f"output:\n  schema: {json.dumps(EXTRACT_SCHEMA)}\n"
        "teacher:\n  logs: [rows.jsonl]\n" + EXTRACT_TRAINING + "gates:\n  min_schema_validity: 1.0\n")
    return root / "spec.yaml"


def compiled(root: Path, write_spec) -> Path:
    """Write a spec into `root` with `write_spec`, compile it there, return the build folder."""
    spec = write_spec(root)
    assert cli("compile", spec, "-o", root / "build", "--cache", root / "cache") == 0
    return root / "build"


@pytest.fixture(scope="module")
def agent_build(tmp_path_factory):
    return compiled(tmp_path_factory.mktemp("agent"), agent_spec)


@pytest.fixture(scope="module")
def extract_build(tmp_path_factory):
    return compiled(tmp_path_factory.mktemp("extract"), extract_spec)


def test_tools_with_ref_pattern_format_and_bounds_compile_and_every_call_validates(tmp_path):
    from distill_compiler import runtime

    build = compiled(tmp_path, lambda root: agent_spec(root, RICH_TOOLS, "rich-agent"))
    bundle = runtime.load_bundle(build / "bundle")
    schemas = {t["name"]: t["parameters"] for t in RICH_TOOLS}
    calls = 0
    for text in ("where is order A15", "please cancel order A22", "cancel A31 today",
                 "where is my parcel A10?", "hello"):
        answer = bundle.predict({"messages": [{"role": "user", "content": text}]})
        for call in answer["output"].get("tool_calls") or ():
            jsonschema.validate(json.loads(call["function"]["arguments"]),
                                schemas[call["function"]["name"]],
                                format_checker=jsonschema.FormatChecker())
            calls += 1
    assert calls >= 1


def test_agent_bundle_calls_tools_with_valid_arguments(agent_build):
    from distill_compiler import runtime

    assert {p.name for p in (agent_build / "bundle").iterdir()} == BUNDLE_FILES
    bundle = runtime.load_bundle(agent_build / "bundle")
    answer = bundle.predict({"messages": [{"role": "user", "content": "where is order A15"}]})
    assert answer["route"] in ("student", "teacher")
    [call] = answer["output"]["tool_calls"]
    tool = next(t for t in TOOLS if t["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["parameters"])
    triggered = bundle.predict({"messages": [{"role": "user", "content": "my lawyer wants A15"}]})
    assert triggered["route"] == "teacher" and triggered["reason"].startswith("trigger")
    with pytest.raises(runtime.InputError):
        bundle.predict({"messages": [], "tools": ["get_order"]})
    with pytest.raises(runtime.InputError):
        bundle.predict({"messages": [{"role": "user", "content": "hi"}], "tools": ["nope"]})


def test_agent_metrics_show_constrained_validity_and_a_fitted_cascade(agent_build):
    report = json.loads((agent_build / "bundle" / "report.json").read_text())
    metrics = report["metrics"]
    assert metrics["test"]["schema_validity"] == 1.0
    assert metrics["test"]["n"] == metrics["n"]["test"] > 0
    # Tool choice is a training outcome: 1.0 on an AVX-512 machine, 0.39 on an AVX2-only EPYC
    # (float kernels differ), so only its presence and range are asserted here.
    assert metrics["test"]["call_turns"] > 0
    assert 0.0 <= metrics["test"]["tool_name_accuracy"] <= 1.0
    assert 0.0 <= metrics["cascade"]["test"]["escalation_rate"] <= 1.0
    assert metrics["speed"]["constrained"]["tokens_per_second"] > 0
    assert report["parity"]["fp32_exact"] == 1.0
    assert [g["gate"] for g in report["gates"]] == ["min_schema_validity"]


def test_extract_bundle_answers_valid_json_through_the_cli(extract_build, capsys):
    capsys.readouterr()
    assert cli("run", extract_build / "bundle", '{"message": "my order A21 came broken"}') == 0
    answer = json.loads(capsys.readouterr().out)
    jsonschema.validate(answer["output"], EXTRACT_SCHEMA)
    metrics = json.loads((extract_build / "bundle" / "report.json").read_text())["metrics"]
    assert metrics["test"]["schema_validity"] == 1.0
    # The fixture is learnable: a scratch student copies order ids and maps the wording.
    assert metrics["test"]["agreement"] >= 0.8 and metrics["test"]["fields"]["f1"] >= 0.9
