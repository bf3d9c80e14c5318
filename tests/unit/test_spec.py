"""Valid specs, overrides, the generated JSON Schema and the field docs."""

import json
from pathlib import Path

import pytest

from distill_compiler import spec as spec_mod
from distill_compiler.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
name: demo
task: classify
intents:
  - {name: billing, description: Charges and invoices., confusable_with: [refund]}
  - {name: refund, description: Money back.}
refusals:
  - {name: legal_advice, description: Legal questions., response: "No legal advice."}
teacher: {logs: [log.jsonl]}
"""


def test_minimal_spec_fills_defaults_and_is_frozen():
    spec = spec_mod.parse_spec(MINIMAL)
    assert spec.student.base == "minilm-l6" and spec.export.quantize == "int8"
    assert spec_mod.class_labels(spec.intents, spec.refusals) == (
        "billing", "refund", "legal_advice", "out_of_scope")
    with pytest.raises(Exception):
        spec.student.epochs = 9


def test_decoder_tasks_default_to_the_pretrained_decoder():
    agent = ("name: a\ntask: agent\nteacher: {logs: [l.jsonl]}\n"
             "tools: [{name: t, description: T, parameters: {type: object, properties: {}}}]\n")
    spec = spec_mod.parse_spec(agent)
    assert (spec.student.base, spec.student.method) == ("smollm2-135m", "sft")
    chosen = spec_mod.parse_spec(agent + "student: {base: 'scratch:2x64', epochs: 0}\n")
    assert (chosen.student.base, chosen.student.method, chosen.student.epochs) == (
        "scratch:2x64", "sft", 0)
    assert spec_mod.parse_spec(MINIMAL).student.method == "kd"
    with pytest.raises(SpecError, match="epochs 0"):
        spec_mod.parse_spec(MINIMAL + "student: {epochs: 0}\n")


def test_overrides_apply_dotted_keys_and_are_validated():
    spec = spec_mod.parse_spec(MINIMAL, overrides={"student.epochs": 5, "export.quantize": "none"})
    assert spec.student.epochs == 5 and spec.export.quantize == "none"
    with pytest.raises(SpecError) as caught:
        spec_mod.parse_spec(MINIMAL, overrides={"student.epoch": 5})
    assert "did you mean 'epochs'" in caught.value.render()


def test_reference_specs_and_examples_are_valid():
    paths = sorted(ROOT.glob("specs/*.yaml")) + sorted(ROOT.glob("examples/*/spec.yaml"))
    assert paths, "no reference specs found"
    for path in paths:
        spec_mod.load_spec(path)


def test_reference_specs_cover_every_task_type():
    tasks = {spec_mod.load_spec(p).task for p in ROOT.glob("specs/*.yaml")}
    assert tasks == {"classify", "extract", "agent"}


def test_checked_in_json_schema_is_current():
    checked_in = json.loads((ROOT / "specs" / "task-spec.schema.json").read_text())
    assert checked_in == spec_mod.json_schema(), (
        "specs/task-spec.schema.json is stale: run `distill schema -o specs/task-spec.schema.json`")


def test_json_schema_accepts_reference_specs_and_carries_docs():
    import jsonschema
    import yaml

    schema = spec_mod.json_schema()
    for path in ROOT.glob("specs/*.yaml"):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    teacher = schema["$defs"]["TeacherSpec"]["properties"]
    assert "litellm" in teacher["model"]["description"]


def test_every_field_is_documented():
    undocumented = [name for name, _, doc in spec_mod.field_docs() if not doc]
    assert undocumented == []


def test_a_log_label_can_mean_one_intent_only():
    from distill_compiler.errors import SpecError
    from distill_compiler.spec.load import parse_spec

    text = ("name: demo\ntask: classify\nintents:\n"
            "  - {name: refund, description: Money back., log_labels: [Refund_not_showing_up]}\n"
            "  - {name: billing, description: Charges., log_labels: [Refund_not_showing_up]}\n"
            "teacher: {logs: [log.csv]}\n")
    with pytest.raises(SpecError, match=r"spec.yaml:5:\d+: error: intents\[1\]\.log_labels\[0\]: "
                                        r"log label 'Refund_not_showing_up' already means intent "
                                        r"'refund'"):
        parse_spec(text)
