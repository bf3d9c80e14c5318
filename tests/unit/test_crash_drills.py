"""Crash drills: SIGKILL a real `distill compile` at chosen points and check what it leaves.

Each drill runs the CLI in a subprocess (tests/crash_driver.py: `distill`, with one function
wrapped to stop at a named point), waits for something observable (the point's signal file,
a count of teacher answers), kills it with SIGKILL, then looks at the cache and the build and
reruns. The teacher is the fake OpenAI-compatible server on a real socket (the one test
double, at the hosted-API boundary); every stage is the real one, on a tiny encoder.

`python -m pytest -q -s tests/unit/test_crash_drills.py` prints the counts quoted in
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cli_runner import cli
from teacher_server import FakeTeacher
from tiny_models import build_tiny_encoder, classify_examples

from distill_compiler import pipeline
from distill_compiler.artifacts import check_artifact, open_artifact
from distill_compiler.spec.load import load_spec

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "crash_driver.py"
# One thread: the tiny model's matrices gain nothing from a second, and idle OpenMP threads
# spinning on a busy 2-core machine cost more than the training itself.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TIMEOUT_S = 300  # a loaded 2-core CI machine; each drill takes seconds when idle

SPEC = """
name: drill
task: classify
intents:
  - {{name: billing, description: "Charges, invoices and refunds."}}
  - {{name: password_reset, description: The user cannot log in.}}
teacher: {{logs: [log.jsonl]}}
data: {{per_intent: 0, holdout: 0.2, seed: 1}}
student: {{base: {encoder}, epochs: 3, learning_rate: 0.002, batch_size: 8, max_length: 32,
          device: cpu}}
export: {{quantize: int8, max_length: 32, min_parity: 0.5}}
gates: {{min_teacher_agreement: null, max_escalation_rate: null}}
"""


def report(line: str) -> None:
    print(f"\ncrash drill {line}")


# --------------------------------------------------------------------------- the subprocess

class Run:
    """One `distill` subprocess, stopped at `point` (see crash_driver.py) or run through."""

    def __init__(self, root: Path, point: str, *args):
        tag = uuid.uuid4().hex[:6]
        self.signal = root / f"signal-{tag}"
        self.err_path = root / f"run-{tag}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER), point, str(self.signal), *map(str, args)],
                stdout=subprocess.DEVNULL, stderr=err, env=ENV, cwd=root)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what} after {TIMEOUT_S}s:\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def at_point(self) -> None:
        self.wait_until(self.signal.exists, f"signal {self.signal.name}")

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def release(self) -> None:
        self.signal.with_name(self.signal.name + ".go").touch()

    def finish(self) -> str:
        rc = self.proc.wait(timeout=TIMEOUT_S)
        assert rc == 0, self.stderr[-3000:]
        return self.stderr


# --------------------------------------------------------------------------- what is left

def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "store").glob("*/*") if p.is_dir())


def corrupt_entries(cache: Path) -> list[str]:
    """Store entries that do not open with verify=True, with why."""
    return [f"{p.parent.name}/{p.name[:8]}: {why}" for p in entries(cache)
            for artifact, why in [check_artifact(p)] if artifact is None]


def teacher_rows(cache: Path) -> int:
    try:
        with sqlite3.connect(cache / "teacher.sqlite", timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


def bundle_name(bundle: Path) -> str:
    """The name of the bundle at `bundle`, loaded as `distill run` loads it (checksums verified)."""
    from distill_compiler import runtime

    return runtime.load_bundle(bundle).manifest["name"]


# --------------------------------------------------------------------------- a built project

@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Path:
    """A compiled tiny classify project (spec, cache, build); drills work on copies."""
    root = tmp_path_factory.mktemp("warm")
    texts = [t for t, _ in classify_examples(20)]
    encoder = build_tiny_encoder(tmp_path_factory.mktemp("encoder"), texts=texts)
    rows = [{"input": {"message": t}, "label": label} for t, label in classify_examples(20)]
    (root / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "spec.yaml").write_text(SPEC.format(encoder=encoder))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as ENV does for the subprocesses
    try:
        assert cli("compile", root / "spec.yaml", *args_of(root)) == 0
    finally:
        torch.set_num_threads(threads)
    assert corrupt_entries(root / "cache") == []
    return root


def args_of(root: Path, *more) -> list:
    return ["-o", root / "build", "--cache", root / "cache", *more]


def copy_of(warm: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(warm, root, symlinks=True)
    return root


def project_of(root: Path, **overrides) -> pipeline.Project:
    spec_path = root / "spec.yaml"
    return pipeline.Project.of(load_spec(spec_path, overrides), spec_path, root / "build",
                               root / "cache")


# --------------------------------------------------------------------------- generate

GENERATE_SPEC = """
name: generate-drill
task: classify
intents:
  - {{name: billing, description: "Charges, invoices and payment methods."}}
  - {{name: refund, description: "Money back for a returned or cancelled order."}}
teacher: {{model: openai/x, api_base: {api_base}, max_concurrency: 4, max_retries: 0,
          timeout_s: 120}}
data: {{per_intent: 12, registers: [formal, terse]}}
"""
ANSWERED_BEFORE_KILL = 15


def test_kill_during_generate_repays_no_answered_request(tmp_path):
    """Killed with 15 answers cached and more requests in flight, the rerun asks only for
    what had no answer: no prompt is answered twice over the two runs."""
    with FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as teacher:
        (tmp_path / "spec.yaml").write_text(GENERATE_SPEC.format(api_base=teacher.api_base))
        args = ["compile", tmp_path / "spec.yaml", *args_of(tmp_path), "--until", "generate"]
        cache = tmp_path / "cache"

        teacher.hold_after = ANSWERED_BEFORE_KILL
        first = Run(tmp_path, "none", *args)
        first.wait_until(lambda: teacher.answered == ANSWERED_BEFORE_KILL and teacher.held >= 1
                         and teacher_rows(cache) == ANSWERED_BEFORE_KILL,
                         f"{ANSWERED_BEFORE_KILL} answers cached")
        first.kill9()
        in_flight = teacher.held
        assert integrity(cache / "teacher.sqlite") == "ok"
        assert teacher_rows(cache) == ANSWERED_BEFORE_KILL
        teacher.release_held()

        rerun = Run(tmp_path, "none", *args)
        rerun.finish()
        total = teacher_rows(cache)
        rerun_answered = teacher.answered - ANSWERED_BEFORE_KILL
        summary = json.loads((tmp_path / "build" / "distill.lock").read_text())["generate"]["summary"]
        repaid = sum(n - 1 for n in teacher.answered_prompts.values())

    assert total > ANSWERED_BEFORE_KILL
    assert summary["cached_requests"] == ANSWERED_BEFORE_KILL
    assert summary["teacher_requests"] == rerun_answered == total - ANSWERED_BEFORE_KILL
    assert max(teacher.answered_prompts.values()) == 1 and repaid == 0
    assert len(teacher.answered_prompts) == total
    assert corrupt_entries(cache) == []
    report(f"generate: 1 kill with {ANSWERED_BEFORE_KILL}/{total} answers cached and "
           f"{in_flight} more in flight (unanswered); rerun sent {rerun_answered} (= {total} - "
           f"{ANSWERED_BEFORE_KILL}), requests re-paid {repaid}, teacher cache integrity ok")


BATCH_SPEC = GENERATE_SPEC.replace("max_retries: 0,", "max_retries: 0, batch: true, batch_poll_s: 0.05,")


def open_batch_ids(cache: Path) -> list[str]:
    try:
        with sqlite3.connect(cache / "teacher.sqlite", timeout=5) as db:
            return [row[0] for row in db.execute("SELECT batch_id FROM batches")]
    except sqlite3.Error:  # not created yet
        return []


def test_kill_while_a_batch_runs_resumes_polling_it_and_pays_nothing_twice(tmp_path):
    """teacher.batch: killed while polling its first batch, the rerun polls that batch
    (its id was committed before the first poll) instead of sending it again."""
    with FakeTeacher({"billing": ["charge"], "refund": ["refund"]}) as teacher:
        (tmp_path / "spec.yaml").write_text(BATCH_SPEC.format(api_base=teacher.api_base))
        args = ["compile", tmp_path / "spec.yaml", *args_of(tmp_path), "--until", "generate"]
        cache = tmp_path / "cache"

        teacher.batch.hold = True
        first = Run(tmp_path, "none", *args)
        first.wait_until(lambda: open_batch_ids(cache) == ["batch_1"]
                         and teacher.batch.retrieves >= 2, "the first batch polled")
        first.kill9()
        assert integrity(cache / "teacher.sqlite") == "ok"
        assert teacher.batch.paid == 0 and teacher_rows(cache) == 0
        teacher.batch.hold = False

        Run(tmp_path, "none", *args).finish()
        total = teacher_rows(cache)
        summary = json.loads((tmp_path / "build" / "distill.lock").read_text())["generate"]["summary"]
        created, paid = teacher.batch.created, teacher.batch.paid
        repaid = sum(n - 1 for n in teacher.batch.paid_prompts.values())

    # batch_1 (the generation prompts) resumed, batch_2 (their labels) sent by the rerun.
    assert created == 2 and open_batch_ids(cache) == []
    assert paid == total == summary["teacher_requests"] and repaid == 0
    assert teacher.hits == 0  # nothing went to the per-request endpoint
    report(f"batch: 1 kill while polling batch_1; the rerun polled it and sent 1 more batch, "
           f"{paid} lines paid for {total} answers, requests re-paid {repaid}")


WRITER = """
import sys
from pathlib import Path
from distill_compiler.teacher.cache import RequestCache
cache = RequestCache(Path(sys.argv[1]))
i = 0
while True:
    cache.put(f"k{i}", "m", {"content": f"answer {i} " + "x" * 4000, "cost_usd": 0.001})
    i += 1
"""


def test_teacher_cache_survives_a_kill_mid_write_and_refuses_a_damaged_file(tmp_path):
    """A writer killed while committing rows as fast as it can leaves a sound database with
    every committed answer; a file truncated by hand is moved aside, not read."""
    from distill_compiler.teacher.cache import RequestCache
    from distill_compiler.teacher.client import cached_reply

    path = tmp_path / "teacher.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=ENV)
    deadline = time.monotonic() + TIMEOUT_S
    while teacher_rows(tmp_path) < 300:
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL

    assert integrity(path) == "ok"
    cache = RequestCache(path)
    rows = len(cache)
    lost = [i for i in range(rows) if (cache.get(f"k{i}") or {}).get("content", "")
            .split(" ")[:2] != ["answer", str(i)]]
    assert cache.recovered is None and rows >= 300 and lost == []
    with sqlite3.connect(path) as db:  # rows edited by hand: not JSON, a field gone
        db.execute("UPDATE responses SET reply = 'not json' WHERE key = 'k0'")
        db.execute("""UPDATE responses SET reply = '{"content": "x"}' WHERE key = 'k1'""")
    assert cache.get("k0") is None and cached_reply("k1", cache.get("k1")) is None
    with sqlite3.connect(path) as db:  # fold the WAL in, then cut the file by hand
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.close()
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)

    damaged = RequestCache(path)
    assert damaged.recovered and "unreadable" in damaged.recovered and len(damaged) == 0
    assert [p.name for p in tmp_path.glob("teacher.sqlite.corrupt-*")]
    report(f"teacher cache: 1 kill mid-write after {rows} commits, integrity ok, committed "
           f"answers lost {len(lost)}; hand-edited rows trusted 0 of 2; truncated file trusted 0 "
           "(moved aside, rebuilt empty)")


# --------------------------------------------------------------------------- train

TRAIN_POINTS = ("train-step", "checkpoint-half", "sealed:train")


def test_kill_during_train_never_commits_or_reuses_a_partial_checkpoint(warm, tmp_path):
    """Killed mid-fine-tuning, with the checkpoint half written, and sealed but not renamed:
    no train entry appears, nothing committed before is lost, the compile lock of the dead
    process blocks nobody, and the rerun trains afresh into a store that verifies clean."""
    root = copy_of(warm, tmp_path)
    cache = root / "cache"
    warm_train = [p.name for p in entries(cache) if p.parent.name == "train"]
    shutil.rmtree(cache / "store" / "train")
    before = {p.relative_to(cache) for p in entries(cache)}
    args = ["compile", root / "spec.yaml", *args_of(root), "--until", "train"]
    left = {}
    for point in TRAIN_POINTS:
        run = Run(root, point, *args)
        run.at_point()
        work = sorted((cache / "tmp").glob("train-*"))
        left[point] = sorted(p.relative_to(work[0]).as_posix()
                             for p in work[0].rglob("*") if p.is_file()) if work else []
        run.kill9()
        assert "waiting for the build lock" not in run.stderr
        assert not (cache / "store" / "train").exists()
        assert [s.status for s in pipeline.plan(project_of(root))][:3] == \
            ["cached", "cached", "stale"]
        assert corrupt_entries(cache) == []
    assert left["train-step"] == []
    assert "labels.json" not in left["checkpoint-half"] and \
        any(f.startswith("model/") for f in left["checkpoint-half"])
    assert "artifact.json" in left["sealed:train"]

    rerun = Run(root, "none", *args)
    stderr = rerun.finish()
    assert "waiting for the build lock" not in stderr
    assert "removed 1 unfinished work dir" in stderr and "train: running" in stderr
    after = {p.relative_to(cache) for p in entries(cache)}
    lost = len(before - after)
    assert lost == 0 and corrupt_entries(cache) == []
    assert list((cache / "tmp").iterdir()) == []
    train = [p for p in entries(cache) if p.parent.name == "train"]
    assert [p.name for p in train] == warm_train  # the same key as the uninterrupted build
    assert open_artifact(train[0]) is not None
    report(f"train: {len(TRAIN_POINTS)} kills ({', '.join(TRAIN_POINTS)}); partial "
           f"checkpoints committed 0, reused 0; artifacts lost {lost}; store entries "
           f"{len(after)}, corrupt 0; the dead build's lock blocked 0 reruns")


# --------------------------------------------------------------------------- bundle

BUNDLE_POINTS = {"bundle-writing": "drill", "sealed:bundle": "drill",
                 "publish-copying": "drill", "publish-swapped": "drill-v2"}


def test_kill_during_bundle_leaves_the_old_bundle_or_the_new_never_part(warm, tmp_path, capsys):
    """Killed while the bundle stage writes, once it is sealed, half-way through copying it
    beside build/drill/bundle, and right after the swap: what `distill run` loads there is
    always a whole bundle (checksums verified), the old one until the swap."""
    root = copy_of(warm, tmp_path)
    bundle = root / "build" / "bundle"
    args = ["compile", root / "spec.yaml", *args_of(root), "--set", "name=drill-v2"]
    seen = {}
    for point, expected in BUNDLE_POINTS.items():
        run = Run(root, point, *args)
        run.at_point()
        run.kill9()
        seen[point] = bundle_name(bundle)
        assert seen[point] == expected, point
        assert corrupt_entries(root / "cache") == []
    rerun = Run(root, "none", *args)
    rerun.finish()
    assert bundle_name(bundle) == "drill-v2"
    assert sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(".")) == []
    capsys.readouterr()
    assert cli("run", bundle, '{"message": "I was charged twice for my phone"}') == 0
    assert json.loads(capsys.readouterr().out)["route"] in ("student", "teacher", "refusal")
    assert corrupt_entries(root / "cache") == []
    with capsys.disabled():
        report(f"bundle: {len(BUNDLE_POINTS)} kills ({', '.join(BUNDLE_POINTS)}); bundle at "
               f"build/<name>/bundle after each: {', '.join(seen.values())} (whole, verified); "
               f"half-written bundles loadable 0, missing 0; leftovers after the rerun 0")


# --------------------------------------------------------------------------- two compiles

def test_two_compiles_of_one_spec_wait_on_the_lock_and_agree(warm, tmp_path):
    """A second compile started while the first is building says whose lock it waits for,
    then finds everything the first built; two started at once both finish. The cache
    verifies clean after both pairs."""
    root = copy_of(warm, tmp_path)
    cache = root / "cache"
    args = ["compile", root / "spec.yaml", *args_of(root), "--set", "name=drill-v3"]
    first = Run(root, "bundle-writing", *args)
    first.at_point()
    second = Run(root, "none", *args)
    second.wait_until(lambda: f"waiting for the build lock held by pid {first.pid}"
                      in second.stderr, "the lock message")
    assert second.proc.poll() is None
    first.release()
    assert "1 stage(s) ran, 5 cached" in first.finish()
    assert "0 stage(s) ran, 6 cached" in second.finish()
    assert bundle_name(root / "build" / "bundle") == "drill-v3"
    assert corrupt_entries(cache) == []

    together = [Run(root, "none", "compile", root / "spec.yaml", *args_of(root),
                    "--set", "name=drill-v4") for _ in range(2)]
    outputs = [run.finish() for run in together]
    assert sorted("1 stage(s) ran" in out for out in outputs) == [False, True]
    assert bundle_name(root / "build" / "bundle") == "drill-v4"
    assert corrupt_entries(cache) == [] and list((cache / "tmp").iterdir()) == []
    waited = sum("waiting for the build lock" in out for out in outputs)
    report(f"concurrent compiles: 2 pairs; the second of the first pair waited on the lock "
           f"(pid {first.pid}) and reused all 6 stages; the pair started together: {waited} "
           f"waited, 1 built the bundle, both the same bundle; corrupt entries 0")


# --------------------------------------------------------------------------- hand edits

def test_store_edited_by_hand_is_detected_and_rebuilt(warm, tmp_path, capsys):
    """A truncated curate split, a hand-edited evaluate policy and a generate entry without
    its artifact.json are each named by compile (and plan), rebuilt, and never reach the
    bundle; what they rebuild to is what they held, so train and export stay cached."""
    root = copy_of(warm, tmp_path)
    cache = root / "cache"
    store = {p.parent.name: p for p in entries(cache)}
    split = store["curate"] / "train.jsonl"
    split.write_bytes(split.read_bytes()[: split.stat().st_size // 2])
    policy_path = store["evaluate"] / "policy.json"
    policy = json.loads(policy_path.read_text())
    policy["threshold"] = 0.0  # let the student answer everything
    policy_path.write_text(json.dumps(policy))
    (store["generate"] / "artifact.json").unlink()

    capsys.readouterr()
    assert cli("plan", root / "spec.yaml", *args_of(root)) == 0
    plan = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "cache entry corrupt: no artifact.json" in plan["generate"]
    assert cli("compile", root / "spec.yaml", *args_of(root)) == 0
    err = capsys.readouterr().err
    said = {stage: why for stage, why in
            re.findall(r"^(\w+): running \(cache entry corrupt: (.*); rebuilding it\)$", err, re.MULTILINE)}
    assert said == {
        "generate": "no artifact.json (left unfinished or damaged)",
        "curate": "train.jsonl changed since it was committed (truncated or edited)",
        "evaluate": "policy.json changed since it was committed (truncated or edited)"}
    status = dict(re.findall(r"^(generate|curate|train|export|evaluate|bundle)\s+(ran|cached)\b",
                             err, re.MULTILINE))
    assert status == {"generate": "ran", "curate": "ran", "train": "cached", "export": "cached",
                      "evaluate": "ran", "bundle": "ran"}
    assert corrupt_entries(cache) == []
    shipped = json.loads((root / "build" / "bundle" / "policy.json").read_text())
    assert shipped["threshold"] == json.loads(
        (warm / "build" / "bundle" / "policy.json").read_text())["threshold"] != 0.0
    with capsys.disabled():
        report("hand-edited store: 3 entries damaged (split truncated, policy edited, "
               "artifact.json deleted); detected 3 (each named with the file), rebuilt 3, "
               "trusted 0; train and export stayed cached")
