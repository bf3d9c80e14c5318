"""Cache keys, plan reasons, incremental builds and interrupted stages, on small real stages.

The stages here are tiny but real: they read their spec sections and inputs and write files,
so the pipeline's keying, caching and locking are exercised exactly as with the heavy ones.
"""

import json
import types

import pytest

from distill_compiler import pipeline
from distill_compiler.artifacts import open_artifact
from distill_compiler.spec.load import parse_spec

SPEC = """
name: demo
task: classify
intents:
  - {name: billing, description: Charges.}
  - {name: refund, description: Money back.}
teacher: {logs: [log.jsonl], max_concurrency: 4}
student: {epochs: 3}
export: {quantize: int8}
"""


def make_stage(name, keyed_on, inputs=(), version="1", body=None, files=None):
    module = types.ModuleType(f"fake.{name}")
    module.VERSION, module.KIND, module.KEYED_ON, module.INPUTS = version, name, keyed_on, inputs
    module.calls = 0

    def run(ctx):
        module.calls += 1
        if body:
            return body(ctx)
        values = {s: str(getattr(ctx.spec, s)) for s in keyed_on}
        upstream = {u: (a.path / "out.json").read_text() for u, a in ctx.inputs.items()}
        (ctx.out / "out.json").write_text(json.dumps({"values": values, "up": upstream}))
        return {"n": len(values)}

    module.run = run
    if files:
        module.external_files = files
    return module


@pytest.fixture
def stages():
    return [
        make_stage("generate", ("task", "teacher"),
                   files=lambda spec, d: {f"teacher.logs[{i}]": d / p for i, p in enumerate(spec.teacher.logs)}),
        make_stage("train", ("student",), inputs=("generate",)),
        make_stage("export", ("export",), inputs=("train",)),
    ]


@pytest.fixture
def project_factory(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"input": "a", "label": "billing"}\n')
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC)

    def make(**overrides):
        return pipeline.Project.of(parse_spec(SPEC, overrides=overrides), spec_path)
    return make


def test_key_is_stable_under_key_order():
    a = pipeline.stage_key("train", "1", {"student": {"epochs": 3, "alpha": 0.5}}, {"x": "d"}, {})
    b = pipeline.stage_key("train", "1", {"student": {"alpha": 0.5, "epochs": 3}}, {"x": "d"}, {})
    assert a == b


def test_key_changes_with_version_sections_inputs_and_files():
    base = ("train", "1", {"student": {"epochs": 3}}, {"curate": "d1"}, {"f": "h"})
    key = pipeline.stage_key(*base)
    assert pipeline.stage_key("train", "2", *base[2:]) != key
    assert pipeline.stage_key("train", "1", {"student": {"epochs": 4}}, *base[3:]) != key
    assert pipeline.stage_key("train", "1", base[2], {"curate": "d2"}, base[4]) != key
    assert pipeline.stage_key("train", "1", base[2], base[3], {"f": "h2"}) != key


def test_stage_sees_only_its_sections(stages, project_factory):
    seen = {}

    def peek(ctx):
        seen["student"] = ctx.spec.student.epochs
        with pytest.raises(AttributeError, match="not keyed on spec section 'export'"):
            _ = ctx.spec.export
        (ctx.out / "out.json").write_text("{}")
    stages[1] = make_stage("train", ("student",), inputs=("generate",), body=peek)
    pipeline.build(project_factory(), stages=stages)
    assert seen == {"student": 3}


def test_rebuild_reruns_only_what_changed(stages, project_factory):
    pipeline.build(project_factory(), stages=stages)
    assert [s.calls for s in stages] == [1, 1, 1]
    result = pipeline.build(project_factory(), stages=stages)
    assert [r.cached for r in result.runs] == [True, True, True]
    pipeline.build(project_factory(**{"export.quantize": "none"}), stages=stages)
    assert [s.calls for s in stages] == [1, 1, 2]
    pipeline.build(project_factory(**{"student.epochs": 5}), stages=stages)
    assert [s.calls for s in stages] == [1, 2, 3]


def test_operational_fields_do_not_invalidate(stages, project_factory):
    pipeline.build(project_factory(), stages=stages)
    steps = pipeline.plan(project_factory(**{"teacher.max_concurrency": 64,
                                             "teacher.budget_usd": 3}), stages=stages)
    assert [s.status for s in steps] == ["cached", "cached", "cached"]


def test_plan_names_the_changed_field_and_upstream(stages, project_factory):
    assert [s.reasons for s in pipeline.plan(project_factory(), stages=stages)] == [
        ["never built"], ["upstream generate stale"], ["upstream train stale"]]
    pipeline.build(project_factory(), stages=stages)
    steps = pipeline.plan(project_factory(**{"student.epochs": 5}), stages=stages)
    assert [(s.name, s.status) for s in steps] == [
        ("generate", "cached"), ("train", "stale"), ("export", "stale")]
    assert steps[1].reasons == ["student.epochs: 3.0 -> 5.0"]
    assert steps[2].reasons == ["upstream train stale"]


def test_plan_reports_changed_external_file_and_version(stages, project_factory):
    project = project_factory()
    pipeline.build(project, stages=stages)
    (project.spec_dir / "log.jsonl").write_text('{"input": "b", "label": "refund"}\n')
    assert pipeline.plan(project, stages=stages)[0].reasons == ["file teacher.logs[0] changed"]
    stages[0].VERSION = "2"
    assert "stage VERSION 1 -> 2" in pipeline.plan(project, stages=stages)[0].reasons


def test_unchanged_output_stops_the_rebuild_early(stages, project_factory):
    """A stage rerun that produces identical bytes leaves downstream cached."""
    pipeline.build(project_factory(), stages=stages)
    pipeline.build(project_factory(), stages=stages, force=("generate",))
    assert [s.calls for s in stages] == [2, 1, 1]


def test_a_stage_keyed_on_the_files_it_reads_ignores_the_rest_of_its_input(project_factory):
    """generate's stats.json differs on a rerun answered from the request cache; curate reads
    only examples.jsonl, so it (and the training after it) stays cached."""
    examples = ['{"input": "a"}\n']

    def generate(ctx):
        (ctx.out / "examples.jsonl").write_text(examples[0])
        (ctx.out / "stats.json").write_text(json.dumps({"cached": stages[0].calls}))

    def curate(ctx):
        (ctx.out / "out.json").write_text(ctx.inputs["generate"].file("examples.jsonl").read_text())

    stages = [make_stage("generate", ("task",), body=generate),
              make_stage("curate", ("data",), inputs=("generate",), body=curate),
              make_stage("bundle", ("name",), inputs=("generate", "curate"))]
    stages[1].READS = {"generate": ("examples.jsonl",)}
    stages[2].run = lambda ctx: (ctx.out / "out.json").write_text(
        (ctx.inputs["generate"].path / "stats.json").read_text())
    pipeline.build(project_factory(), stages=stages)
    result = pipeline.build(project_factory(), stages=stages, force=("generate",))
    assert [r.cached for r in result.runs] == [False, True, False]  # bundle reads the stats
    assert [s.status for s in pipeline.plan(project_factory(), stages=stages)] == ["cached"] * 3
    examples[0] = '{"input": "b"}\n'
    result = pipeline.build(project_factory(), stages=stages, force=("generate",))
    assert [r.cached for r in result.runs] == [False, False, False]


def test_interrupted_stage_leaves_no_cache_entry(stages, project_factory):
    def interrupted(ctx):
        (ctx.out / "half.json").write_text("{")
        raise KeyboardInterrupt
    stages[1] = make_stage("train", ("student",), inputs=("generate",), body=interrupted)
    project = project_factory()
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(project, stages=stages)
    assert not (project.cache_root / "store" / "train").exists()
    assert list((project.cache_root / "tmp").iterdir()) == []
    lock = json.loads((project.build_dir / "distill.lock").read_text())
    assert list(lock) == ["generate"]  # the finished stage is recorded, the killed one is not


def test_corrupt_entry_is_a_miss(stages, project_factory):
    project = project_factory()
    first = pipeline.build(project, stages=stages)
    artifact = first.runs[1].artifact
    (artifact.path / "out.json").write_text("tampered")
    assert open_artifact(artifact.path) is None
    assert pipeline.plan(project, stages=stages)[1].reasons == [
        "cache entry corrupt: out.json changed since it was committed (truncated or edited)"]
    pipeline.build(project, stages=stages)
    assert stages[1].calls == 2


def test_missing_entry_and_unfinished_work_are_said_and_swept(stages, project_factory):
    project = project_factory()
    first = pipeline.build(project, stages=stages)
    import shutil
    shutil.rmtree(first.runs[2].artifact.path)
    (project.cache_root / "tmp" / "train-dead00000000").mkdir()
    assert pipeline.plan(project, stages=stages)[2].reasons == ["cache entry missing"]
    logged = []

    class Log(pipeline.Reporter):
        def log(self, message):
            logged.append(message)
    pipeline.build(project, stages=stages, reporter=Log())
    assert list((project.cache_root / "tmp").iterdir()) == []
    assert any("removed 1 unfinished work dir" in m for m in logged)
    assert stages[2].calls == 2


def test_a_second_build_waits_for_the_compile_lock_and_names_its_holder(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    from distill_compiler.cache import compile_lock

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from distill_compiler.cache import compile_lock
        with compile_lock({str(tmp_path)!r}, print):
            print("held", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert holder.stdout.readline() == "held\n"
    waits = []

    def on_wait(message):
        waits.append(message)
        holder.stdin.write("\n")  # let the holder go only once we are known to wait
        holder.stdin.flush()
    with compile_lock(tmp_path, on_wait):
        pass
    assert holder.wait(timeout=60) == 0
    assert len(waits) == 1 and f"held by pid {holder.pid} (started " in waits[0]
    with compile_lock(tmp_path, waits.append):  # released with its holder: no wait
        pass
    assert len(waits) == 1


def test_lock_records_keys_inputs_outputs_and_durations(stages, project_factory):
    project = project_factory()
    result = pipeline.build(project, stages=stages)
    lock = json.loads((project.build_dir / "distill.lock").read_text())
    assert lock["train"]["key"] == result.runs[1].artifact.meta["key"]
    assert lock["train"]["inputs"] == {"generate": result.runs[0].artifact.digest}
    assert lock["train"]["output"] == result.runs[1].artifact.digest
    assert lock["train"]["duration_s"] >= 0 and lock["train"]["summary"] == {"n": 1}


def test_until_and_unknown_stage(stages, project_factory):
    result = pipeline.build(project_factory(), stages=stages, until="train")
    assert [r.name for r in result.runs] == ["generate", "train"]
    with pytest.raises(Exception, match="unknown stage 'nope'"):
        pipeline.build(project_factory(), stages=stages, until="nope")


def test_bundle_is_published_atomically(tmp_path, project_factory):
    def write_bundle(ctx):
        (ctx.out / "model.onnx").write_bytes(b"onnx")
    stages = [make_stage("bundle", ("name",), body=write_bundle)]
    project = project_factory()
    pipeline.build(project, stages=stages)
    assert sorted(p.name for p in project.bundle_dir.iterdir()) == ["model.onnx"]
    assert [p.name for p in project.build_dir.iterdir() if p.name.startswith(".")] == []
