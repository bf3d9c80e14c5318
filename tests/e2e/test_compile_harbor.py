"""A full spec-to-bundle compile on CPU: the harbor-support example with a tiny local encoder
standing in for MiniLM, then the bundle answered through the CLI and the runtime, an
incremental rebuild, and a tampered bundle refused.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_runner import cli
from tiny_models import build_tiny_encoder

from distill_compiler import pipeline
from distill_compiler.spec.load import load_spec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "harbor-support" / "spec.yaml"
BUNDLE_FILES = {"model.onnx", "tokenizer.json", "policy.json", "manifest.json", "report.json",
                "MODEL_CARD.md", "report.html"}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compile once for the module; returns the arguments that address this build."""
    root = tmp_path_factory.mktemp("harbor")
    log = SPEC.parent / "data" / "teacher_log.jsonl"
    texts = [json.loads(line)["input"]["message"] for line in log.read_text().splitlines()]
    encoder = build_tiny_encoder(root / "encoder", texts=texts, hidden=32, layers=2)
    args = ["-o", root / "build", "--cache", root / "cache",
            "--set", f"student.base={encoder}", "--set", "student.epochs=4",
            "--set", "student.learning_rate=0.003", "--set", "export.min_parity=0.8",
            "--set", "gates.min_teacher_agreement=null", "--set", "gates.max_escalation_rate=null"]
    assert cli("compile", SPEC, *args) == 0
    return root, args


def test_bundle_has_exactly_the_promised_files(build):
    root, _ = build
    assert {p.name for p in (root / "build" / "bundle").iterdir()} == BUNDLE_FILES
    lock = json.loads((root / "build" / "distill.lock").read_text())
    assert set(lock) == set(pipeline.STAGE_NAMES)


def test_runtime_answers_route_and_validate(build):
    from distill_compiler import runtime

    root, _ = build
    bundle = runtime.load_bundle(root / "build" / "bundle")
    labels = set(bundle.labels)
    answer = bundle.predict({"message": "My lawyer says your court summons is late"})
    assert answer["route"] == "teacher" and answer["reason"].startswith("trigger")
    answers = bundle.predict_batch([{"message": "I forgot my password"},
                                    {"message": "where is my parcel #HB-10293?"}])
    for a in answers:
        assert a["route"] in ("student", "teacher", "refusal", "out_of_scope")
        assert 0.0 <= a["confidence"] <= 1.0
        assert a["label"] in labels | {"out_of_scope"}
        # The export carries the pooled embedding, so every answer has a detector score.
        assert isinstance(a["out_of_scope_score"], float)
    assert bundle.policy.detector is not None and bundle.policy.data["format"] == 2
    with pytest.raises(runtime.InputError):
        bundle.predict({"msg": "wrong field"})


def test_distill_run_prints_the_answer(build, capsys):
    root, _ = build
    capsys.readouterr()
    assert cli("run", root / "build" / "bundle", '{"message": "refund my order please"}') == 0
    answer = json.loads(capsys.readouterr().out)
    assert set(answer) >= {"output", "confidence", "route", "reason"}
    assert cli("run", root / "build" / "bundle", "not json") == 2


def test_rebuild_is_cached_and_a_change_reruns_only_downstream(build, capsys):
    root, args = build
    capsys.readouterr()
    assert cli("plan", SPEC, *args) == 0
    assert all(" cached" in line for line in capsys.readouterr().out.splitlines())
    changed = [*args, "--set", "export.quantize=none"]
    assert cli("plan", SPEC, *changed) == 0
    plan = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "cached" in plan["train"] and "export.quantize: \"int8\" -> \"none\"" in plan["export"]
    overrides = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in changed[5::2])}
    project = pipeline.Project.of(load_spec(SPEC, overrides), SPEC, root / "build", root / "cache")
    result = pipeline.build(project)
    assert {r.name: r.cached for r in result.runs} == {
        "generate": True, "curate": True, "train": True,
        "export": False, "evaluate": False, "bundle": False}
    assert result.summary("export")["quantize"] == "none"
    assert load_spec(SPEC).export.quantize == "int8"  # --set never touches the file


def test_tampered_bundle_is_refused(build, tmp_path, capsys):
    root, _ = build
    copy = tmp_path / "bundle"
    shutil.copytree(root / "build" / "bundle", copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    capsys.readouterr()
    assert cli("run", copy, '{"message": "hi"}') == 2
    assert "model.onnx" in capsys.readouterr().err
