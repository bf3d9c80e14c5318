import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_STUDENT, stage_context, tiny_spec
from tiny_models import LABELS, classify_examples

from distill_compiler.errors import StageError
from distill_compiler.stages import export
from distill_compiler.students.classifier.export import Parity, check_parity
from distill_compiler.students.classifier.model import PooledClassifier
from distill_compiler.students.quantize import head_nodes


def torch_logits(checkpoint, texts):
    model, tokenizer = PooledClassifier.load(checkpoint / "model")
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).numpy(), {k: v.numpy() for k, v in enc.items()}


def test_artifact_files_and_parity_report(exported_classifier):
    names = {p.name for p in exported_classifier.iterdir()}
    assert {"model.onnx", "model.fp32.onnx", "tokenizer.json", "labels.json", "parity.json"} <= names
    parity = json.loads((exported_classifier / "parity.json").read_text())
    assert parity["quantize"] == "int8" and parity["n"] == 24
    assert parity["agreement_fp32"] == 1.0 and parity["max_abs_diff_fp32"] < 1e-4
    assert 0.9 <= parity["agreement_shipped"] <= 1.0
    sizes = parity["sizes"]
    assert sizes["model.onnx"] < sizes["model.fp32.onnx"]


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_graph_has_dynamic_axes_and_matches_torch(exported_classifier, trained_classifier,
                                                       batch):
    # Texts of different lengths: the batch is padded, so the mask matters too.
    texts = ["refund me", "I forgot my password for the phone and cannot sign in at all",
             "tell me a joke"][:batch]
    expected, feed = torch_logits(trained_classifier, texts)
    session = ort.InferenceSession(str(exported_classifier / "model.fp32.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)
    (logits,) = session.run(["logits"], feed)
    assert logits.shape == (batch, 3)
    assert np.abs(logits - expected).max() < 1e-4


def test_shipped_int8_graph_runs_and_mostly_agrees(exported_classifier, trained_classifier):
    texts = [t for t, _ in classify_examples(10, offset=40)]
    expected, feed = torch_logits(trained_classifier, texts)
    (logits,) = ort.InferenceSession(str(exported_classifier / "model.onnx")).run(["logits"], feed)
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_int8_keeps_the_classifier_head_in_fp32(exported_classifier):
    import onnx

    fp32, int8 = (onnx.load(str(exported_classifier / name)).graph
                  for name in ("model.fp32.onnx", "model.onnx"))
    gemm = fp32.node[-1]
    assert gemm.op_type == "Gemm" and gemm.output == ["logits"]
    assert head_nodes(exported_classifier / "model.fp32.onnx") == [gemm.name, f"{gemm.name}_MatMul"]
    # quantize_dynamic splits the Gemm into MatMul + Add; both stay float.
    producer = {out: node for node in int8.node for out in node.output}
    add = producer["logits"]
    matmul = producer[add.input[0]]
    assert add.op_type == "Add" and matmul.op_type == "MatMul"
    weights = {t.name: t.data_type for t in int8.initializer}
    assert weights[matmul.input[1]] == weights[add.input[1]] == onnx.TensorProto.FLOAT
    assert "MatMulInteger" in {n.op_type for n in int8.node}  # the encoder is quantized


def test_tokenizer_json_truncates_at_export_length_without_padding(exported_classifier):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(exported_classifier / "tokenizer.json"))
    assert tok.truncation["max_length"] == 32 and tok.padding is None
    assert len(tok.encode(" ".join(["password"] * 100)).ids) == 32


def test_quantize_none_ships_the_fp32_graph(tmp_path, trained_classifier, classify_splits):
    spec = tiny_spec(export={"quantize": "none", "max_length": 32, "min_parity": 1.0})
    summary = export.run(stage_context("export", tmp_path / "out",
                                       {"train": trained_classifier, "curate": classify_splits}, spec))
    assert summary["quantize"] == "none" and summary["agreement"] == 1.0
    assert not (tmp_path / "out" / "model.fp32.onnx").exists()


def test_parity_gate_names_the_figures():
    with pytest.raises(StageError) as err:
        check_parity(Parity(412, 1.0, 0.971, 1e-6), "int8", 0.99)
    assert str(err.value) == ("int8 agrees with the trained model on 97.1% of 412 validation "
                              "examples (< 99.0%)")
    assert "quantize: none" in err.value.hint
    check_parity(Parity(412, 1.0, 0.99, 1e-6), "int8", 0.99)  # at the threshold: passes
    with pytest.raises(StageError) as err:  # just under it: enough digits to show it
        check_parity(Parity(878, 1.0, 869 / 878, 1e-6), "int8", 0.99,
                     [{"variant": "dynamic", "agreement": 0.986},
                      {"variant": "dynamic+fp32x7", "agreement": 869 / 878}])
    assert str(err.value) == ("int8 agrees with the trained model on 98.97% of 878 validation "
                              "examples (< 99.0%); variants tried: dynamic 98.6%, "
                              "dynamic+fp32x7 98.97%")


def barely_trained(tmp_path, make_splits, tiny_encoder_dir, **export_section):
    """No probe and one epoch at a negligible learning rate leave the random head's logits close
    together, so int8 rounding flips some answers; the export stage's context for it."""
    from distill_compiler.stages import train

    splits = make_splits(classify_examples(20), classify_examples(40, offset=20), labels=LABELS)
    spec = tiny_spec(student={"base": str(tiny_encoder_dir), **TINY_STUDENT,
                              "learning_rate": 1e-9, "epochs": 1, "probe": False},
                     export={"quantize": "int8", "max_length": 32, **export_section})
    train.run(stage_context("train", tmp_path / "train", {"curate": splits}, spec))
    return stage_context("export", tmp_path / "out", {"train": tmp_path / "train", "curate": splits},
                         spec)


def test_parity_gate_fails_the_stage_when_no_variant_meets_it(tmp_path, make_splits,
                                                              tiny_encoder_dir, monkeypatch):
    # A search that has only the default dynamic variant to try must refuse the model at the
    # default 99% gate, naming what it tried.
    from distill_compiler.students.classifier import quantize_search

    monkeypatch.setitem(quantize_search.FAMILIES, "dynamic", (quantize_search.Variant("dynamic"),))
    monkeypatch.setattr(quantize_search, "MAX_FP32_MATMULS", 0)
    monkeypatch.setitem(quantize_search.LAST_RESORT, "dynamic", ())
    ctx = barely_trained(tmp_path, make_splits, tiny_encoder_dir, int8_mode="dynamic")
    with pytest.raises(StageError, match=r"^int8 agrees with the trained model on \d+\.\d+% of "
                                         r"120 validation examples \(< 99\.0%\); variants "
                                         r"tried: dynamic \d+\.\d+%$") as err:
        export.run(ctx)
    assert "quantize: none" in err.value.hint and "train longer" in err.value.hint
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert parity["agreement_fp32"] == 1.0 and parity["agreement_shipped"] < 0.99
    assert parity["int8"]["variant"] is None and len(parity["int8"]["tried"]) == 1


def test_the_search_goes_past_a_default_int8_under_the_gate(tmp_path, make_splits,
                                                            tiny_encoder_dir):
    ctx = barely_trained(tmp_path, make_splits, tiny_encoder_dir)
    try:
        summary = export.run(ctx)
    except StageError as err:  # no variant met the gate on this CPU: all are named
        assert "variants tried: dynamic " in str(err) and "static-percentile" in str(err)
        return
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    tried = parity["int8"]["tried"]
    assert tried[0]["variant"] == "dynamic" and tried[0]["agreement"] < 0.99
    assert summary["int8_variant"] == parity["int8"]["variant"] == tried[-1]["variant"] != "dynamic"
    assert parity["agreement_shipped"] == tried[-1]["agreement"] >= 0.99
