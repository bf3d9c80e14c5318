"""A compile under `accelerate launch` with two CPU processes (gloo): the train stage runs as DDP
through Trainer, only the main process writes the cache and the bundle, and the bundle works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compile_causal import agent_spec

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def test_two_processes_train_one_bundle(tmp_path):
    spec = agent_spec(tmp_path)
    spec.write_text(spec.read_text().replace("epochs: 50", "epochs: 6"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        # --multi_gpu is accelerate's torchrun launcher; with no GPU it trains over gloo on CPU
        # (--cpu would pick its single-process launcher).
        [BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", BIN / "distill", "compile", spec,
         "-o", tmp_path / "build", "--cache", tmp_path / "cache"],
        capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "build" / "bundle" / "report.json").read_text())
    assert report["train"]["processes"] == 2
    # One committed checkpoint, no scratch left behind by either process.
    assert len(list((tmp_path / "cache" / "store" / "train").iterdir())) == 1
    assert not any((tmp_path / "cache" / "tmp").iterdir())

    from distill_compiler import runtime

    answer = runtime.load_bundle(tmp_path / "build" / "bundle").predict(
        {"messages": [{"role": "user", "content": "where is order A1003?"}]})
    assert answer["output"]["role"] == "assistant"
