"""Shared fixtures: offline environment, a tiny encoder, curate-style splits, stage contexts, and
a trained + exported tiny classifier for the stages downstream of them.

The builders live in tests/tiny_models.py; the fixtures here stay thin.
"""

from __future__ import annotations

import os

# Before anything imports transformers or litellm: never reach the network from tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import importlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_models import LABELS, build_tiny_encoder, classify_examples, write_splits  # noqa: E402

from distill_compiler.artifacts import Artifact  # noqa: E402
from distill_compiler.pipeline import SpecView, StageContext  # noqa: E402
from distill_compiler.spec.models import Spec  # noqa: E402

# Settings under which the tiny encoder learns the fixture classes in a couple of seconds.
TINY_STUDENT = {"epochs": 6, "learning_rate": 1e-3, "batch_size": 8, "max_length": 32,
                "warmup_ratio": 0.1, "patience": 2, "device": "cpu"}


def tiny_spec(**sections) -> Spec:
    """A classify spec over the fixture labels; keyword arguments replace whole sections."""
    data = {
        "name": "tiny", "task": "classify",
        "intents": [{"name": "billing", "description": "Charges, invoices, refunds."},
                    {"name": "password_reset", "description": "Cannot log in."}],
        "teacher": {"logs": ["log.jsonl"]},
        **sections,
    }
    return Spec.model_validate(data)


def stage_module(name: str):
    return importlib.import_module(f"distill_compiler.stages.{name}")


def stage_context(stage: str, out: Path, inputs: dict[str, Path], spec: Spec,
                  spec_dir: Path | None = None) -> StageContext:
    """A StageContext for running one stage's run() on artifact directories made by hand."""
    module = stage_module(stage)
    artifacts = {name: Artifact(path, stage_module(name).KIND, f"fixture-{name}", {})
                 for name, path in inputs.items()}
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(stage, SpecView(spec, module.KEYED_ON), spec_dir or out.parent,
                        artifacts, out, out.parent / ".distill")


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A saved, untrained 2-layer BERT encoder (hidden 32) + WordPiece tokenizer.json."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture
def make_splits(tmp_path) -> Callable[..., Path]:
    """make_splits(train_pairs, val_pairs, test_pairs=(), labels=None, soft=None) -> splits dir."""
    def make(*args, **kwargs) -> Path:
        return write_splits(tmp_path / "splits", *args, **kwargs)
    return make


@pytest.fixture(scope="session")
def classify_splits(tmp_path_factory) -> Path:
    """Curate-style splits of the 3 fixture classes: 60 train, 24 val, 24 test examples."""
    return write_splits(tmp_path_factory.mktemp("splits"), classify_examples(20),
                        classify_examples(8, offset=20), classify_examples(8, offset=28),
                        labels=LABELS)


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory, tiny_encoder_dir, classify_splits) -> Path:
    """The train stage's artifact directory for the tiny encoder on `classify_splits`."""
    from distill_compiler.stages import train

    out = tmp_path_factory.mktemp("train") / "artifact"
    spec = tiny_spec(student={"base": str(tiny_encoder_dir), **TINY_STUDENT})
    train.run(stage_context("train", out, {"curate": classify_splits}, spec))
    return out


@pytest.fixture(scope="session")
def exported_classifier(tmp_path_factory, trained_classifier, classify_splits) -> Path:
    """The export stage's artifact directory (int8) for `trained_classifier`."""
    from distill_compiler.stages import export

    out = tmp_path_factory.mktemp("export") / "artifact"
    # int8_mode dynamic: the tests on this artifact read a dynamic int8 graph (MatMulInteger);
    # auto could ship static QDQ on a machine where it times faster.
    spec = tiny_spec(export={"quantize": "int8", "int8_mode": "dynamic", "max_length": 32,
                             "min_parity": 0.9})
    export.run(stage_context("export", out,
                             {"train": trained_classifier, "curate": classify_splits}, spec))
    return out


@pytest.fixture(scope="session")
def causal_splits(tmp_path_factory) -> Path:
    """Curate-style agent splits: 48 train traces, 12 val (24 prompts), 6 test."""
    from tiny_causal import write_causal_splits

    return write_causal_splits(tmp_path_factory.mktemp("causal-splits"), "agent", range(48),
                               range(48, 60), range(60, 66))


@pytest.fixture(scope="session")
def trained_causal(tmp_path_factory) -> Path:
    """A train-stage artifact (model/ + chat.json): the tiny Llama fitted to agent traces and
    extractions 0..47."""
    from tiny_causal import train_tiny_causal

    return train_tiny_causal(tmp_path_factory.mktemp("causal-train"), range(48))


@pytest.fixture(scope="session")
def exported_causal(tmp_path_factory, trained_causal, causal_splits) -> Path:
    """The export stage's artifact directory (int8) for `trained_causal` on the agent splits."""
    from tiny_causal import causal_spec

    from distill_compiler.stages import export

    out = tmp_path_factory.mktemp("causal-export") / "artifact"
    spec = causal_spec("agent", export={"quantize": "int8", "min_parity": 0.8,
                                        "max_new_tokens": 48})
    export.run(stage_context("export", out, {"train": trained_causal, "curate": causal_splits},
                             spec))
    return out
