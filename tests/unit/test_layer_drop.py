"""`student.layers`: the cut of a fine-tuned classifier and the train stage that distils it."""

import json

import pytest
import torch
from conftest import TINY_STUDENT, stage_context, tiny_spec
from test_spec import MINIMAL
from tiny_models import LABELS, build_tiny_encoder

from distill_compiler import spec as spec_mod
from distill_compiler.errors import SpecError, StageError
from distill_compiler.stages import train
from distill_compiler.students.classifier.layer_drop import cut, depth_of, kept_layers
from distill_compiler.students.classifier.model import PooledClassifier, load_student


@pytest.fixture(scope="module")
def four_layer_encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("four-layers"), layers=4)


@pytest.fixture(scope="module")
def layered_artifact(tmp_path_factory, four_layer_encoder, classify_splits):
    out = tmp_path_factory.mktemp("train-layers") / "artifact"
    spec = tiny_spec(student={"base": str(four_layer_encoder), **TINY_STUDENT, "layers": 2})
    summary = train.run(stage_context("train", out, {"curate": classify_splits}, spec))
    return out, summary


def test_kept_layers_are_evenly_spaced_and_end_at_the_top():
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(6, 2) == [2, 5]
    assert kept_layers(12, 4) == [2, 5, 8, 11]
    assert kept_layers(6, 1) == [5]
    for depth in range(2, 13):
        for layers in range(1, depth):
            kept = kept_layers(depth, layers)
            assert len(set(kept)) == layers and kept == sorted(kept) and kept[-1] == depth - 1
    for layers in (0, 6, 7):
        with pytest.raises(ValueError):
            kept_layers(6, layers)


def test_cut_keeps_the_chosen_layers_and_the_head_and_leaves_the_original(four_layer_encoder):
    model, _ = load_student(str(four_layer_encoder), four_layer_encoder, list(LABELS))
    small, kept = cut(model, 2)
    assert kept == [1, 3] and depth_of(small) == 2 and depth_of(model) == 4
    assert small.encoder.config.num_hidden_layers == 2
    assert model.encoder.config.num_hidden_layers == 4
    for position, index in enumerate(kept):
        for (name, a), (_, b) in zip(small.encoder.encoder.layer[position].state_dict().items(),
                                     model.encoder.encoder.layer[index].state_dict().items()):
            assert torch.equal(a, b), name
    assert torch.equal(small.head.weight, model.head.weight)
    # A copy, not a view: training the cut must not move the full model.
    small.head.weight.data.add_(1.0)
    assert not torch.equal(small.head.weight, model.head.weight)


def test_train_ships_the_cut_student_and_keeps_the_full_depth_one(layered_artifact):
    out, summary = layered_artifact
    shipped, _ = PooledClassifier.load(out / "model")
    full, _ = PooledClassifier.load(out / "full_depth" / "model")
    assert depth_of(shipped) == 2 and depth_of(full) == 4
    assert summary["layers"] == "2 of 4"
    assert summary["params"] == sum(p.numel() for p in shipped.parameters())
    assert summary["params"] < sum(p.numel() for p in full.parameters())

    log = json.loads((out / "train_log.json").read_text())
    layers = log["layers"]
    assert (layers["kept"], layers["of"]) == ([1, 3], 4)
    assert log["full_depth"]["val_agreement"] == summary["full_depth_val_agreement"]
    assert json.loads((out / "full_depth" / "train_log.json").read_text()) == log["full_depth"]
    # The cut is epoch 0 of its own distillation: what ships is the best of it and every epoch.
    figures = [layers["cut_val_agreement"]] + [e["val_agreement"] for e in layers["epochs"]]
    assert summary["val_agreement"] == figures[summary["best_epoch"]] == max(figures)
    assert log["epochs"] == layers["epochs"] and log["epochs_run"] == len(layers["epochs"])


def test_as_many_layers_as_the_base_fails_before_training(tmp_path, classify_splits,
                                                          four_layer_encoder):
    spec = tiny_spec(student={"base": str(four_layer_encoder), **TINY_STUDENT, "layers": 4})
    with pytest.raises(StageError, match="not fewer than the base's 4 layers"):
        train.run(stage_context("train", tmp_path / "out", {"curate": classify_splits}, spec))
    assert not (tmp_path / "out" / "model").exists()


def test_layers_is_a_spec_error_outside_classify():
    agent = ("name: a\ntask: agent\nteacher: {logs: [l.jsonl]}\n"
             "tools: [{name: t, description: T, parameters: {type: object, properties: {}}}]\n"
             "student:\n  layers: 2\n")
    with pytest.raises(SpecError) as caught:
        spec_mod.parse_spec(agent)
    rendered = caught.value.render()
    assert "spec.yaml:6:11: error: student.layers: layers is for classify" in rendered
    assert spec_mod.parse_spec(MINIMAL + "student: {layers: 3}\n").student.layers == 3
