"""The edge runtime on a tiny hand-built ONNX classifier whose answers are known in advance.

The model is a bag of words: each token has a fixed logit vector and the logits are their
mean over unmasked tokens, so which route a sentence takes is decided by its words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from distill_compiler.runtime import load_bundle
from distill_compiler.runtime.classifier import OnnxClassifier
from distill_compiler.runtime.format import (
    BundleError,
    InputError,
    input_text,
    sha256_file,
    text_field_of,
)
from distill_compiler.runtime.ood import pack

LABELS = ["billing", "password_reset", "technical_bug", "legal_advice", "out_of_scope"]
# Word -> the label it votes for (logit 6); unlisted words vote for nothing (all zeros).
VOTES = {"charged": "billing", "invoice": "billing", "password": "password_reset",
         "login": "password_reset", "crash": "technical_bug", "contract": "legal_advice",
         "weather": "out_of_scope"}
NEUTRAL = ["i", "my", "the", "was", "me", "help", "please", "sue", "hmm", "and", "twice"]


def bag_classifier(out: Path, labels=LABELS, votes=VOTES, neutral=NEUTRAL,
                   embedding: bool = False) -> Path:
    """Write model.onnx (int64 input_ids/attention_mask -> logits) and tokenizer.json to `out`.
    With `embedding`, the graph also outputs `pooled_embedding`: the same mean vector, as the exported
    student outputs the pooled vector its head reads."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for word in [*votes, *neutral]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))

    table = np.zeros((len(vocab), len(labels)), dtype=np.float32)
    for word, label in votes.items():
        table[vocab[word], labels.index(label)] = 6.0
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tok_logits"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["mask3"]),
        helper.make_node("Mul", ["tok_logits", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "seq"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(labels)])]
    if embedding:
        nodes.append(helper.make_node("Identity", ["logits"], ["pooled_embedding"]))
        outputs.append(helper.make_tensor_value_info("pooled_embedding", TensorProto.FLOAT,
                                                     ["batch", len(labels)]))
    graph = helper.make_graph(
        nodes, "bag",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        outputs,
        [numpy_helper.from_array(table, "table"),
         numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "seq")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    return out


def policy(**changes) -> dict:
    base = {
        "format": 1, "task": "classify", "labels": LABELS,
        "input_schema": {"type": "object", "properties": {"message": {"type": "string", "maxLength": 200}},
                         "required": ["message"], "additionalProperties": False},
        "text_field": "message", "max_length": 16, "temperature": 1.0, "threshold": 0.6,
        "always_escalate": ["technical_bug"],
        "triggers": [{"pattern": r"(?i)\bsue\b", "reason": "legal threat"}],
        "refusals": {"legal_advice": "I can't help with legal questions."},
        "out_of_scope_label": "out_of_scope",
    }
    return {**base, **changes}


def write_bundle(root: Path, policy_data: dict, extra: dict[str, str] | None = None,
                 embedding: bool = False) -> Path:
    """A bundle directory: the bag model, a policy, any `extra` files (name -> text) and a
    manifest listing the sha256 of each."""
    bag_classifier(root, embedding=embedding)
    (root / "policy.json").write_text(json.dumps(policy_data))
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    names = ("model.onnx", "tokenizer.json", "policy.json", *(extra or {}))
    files = {n: sha256_file(root / n) for n in names}
    (root / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    return root


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundle"), policy())


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir, threads=1)


@pytest.mark.parametrize("message, route, label, reason", [
    ("charged twice", "student", "billing", "confidence 0.83 >= 0.60"),
    ("my login password", "student", "password_reset", "confidence 0.93 >= 0.60"),
    ("sue me invoice", "teacher", "billing", "trigger: legal threat"),
    ("help contract", "refusal", "legal_advice", "refusal: legal_advice"),
    ("the crash", "teacher", "technical_bug", "always escalate: technical_bug"),
    ("hmm please help", "teacher", "billing", "low confidence 0.20 < 0.60"),
])
def test_routes(bundle, message, route, label, reason):
    result = bundle.predict({"message": message})
    assert (result["route"], result["label"]) == (route, label)
    assert result["reason"] == reason
    assert result["output"]["intent"] == label
    assert set(result) == {"output", "label", "confidence", "route", "reason"}


def test_refusal_returns_the_fixed_response(bundle):
    result = bundle.predict({"message": "contract"})
    assert result["output"] == {"intent": "legal_advice",
                                "response": "I can't help with legal questions."}


def test_probs_are_softmax_with_the_calibration_temperature(tmp_path):
    hot = load_bundle(write_bundle(tmp_path, policy(temperature=2.0)))
    result = hot.predict({"message": "charged"}, probs=True)
    expected = np.exp([3.0, 0, 0, 0, 0]) / np.exp([3.0, 0, 0, 0, 0]).sum()
    assert list(result["probs"].values()) == pytest.approx(expected.tolist())
    assert result["confidence"] == pytest.approx(expected[0])


def test_batch_equals_singles(bundle):
    inputs = [{"message": m} for m in ("charged twice", "crash", "hmm", "contract",
                                       "my password and my login and my invoice please")]
    batch = bundle.predict_batch(inputs, probs=True)
    singles = [bundle.predict(i, probs=True) for i in inputs]
    for b, s in zip(batch, singles):
        assert b["probs"] == pytest.approx(s["probs"], abs=1e-6)
        assert b["confidence"] == pytest.approx(s["confidence"], abs=1e-6)
        assert [b[k] for k in ("output", "label", "route", "reason")] == [
            s[k] for k in ("output", "label", "route", "reason")]


def test_truncation_to_max_length(tmp_path):
    short = load_bundle(write_bundle(tmp_path, policy(max_length=2)))
    # Only "hmm hmm" survives truncation, so the trailing votes for billing never count.
    assert short.predict({"message": "hmm hmm charged charged"})["route"] == "teacher"


def test_invalid_input_is_rejected_with_the_schema_message(bundle):
    with pytest.raises(InputError, match=r"invalid input at \$: 'message' is a required property"):
        bundle.predict({"text": "hi"})
    with pytest.raises(InputError, match=r"at \$\.message: .* is too long") as exc:
        bundle.predict({"message": "x" * 201})
    assert exc.value.path == "$.message"
    with pytest.raises(InputError, match=r"at \$\[1\]\.message: 3 is not of type 'string'"):
        bundle.predict_batch([{"message": "ok"}, {"message": 3}])


def test_tampered_model_is_refused(tmp_path):
    root = write_bundle(tmp_path, policy())
    data = bytearray((root / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"^model\.onnx: sha256 does not match manifest\.json"):
        load_bundle(root)


def test_missing_file_and_missing_manifest_are_refused(tmp_path):
    root = write_bundle(tmp_path / "a", policy())
    (root / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"^tokenizer\.json: missing from the bundle"):
        load_bundle(root)
    (root / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(root)


def test_unsupported_policy_is_refused(tmp_path):
    with pytest.raises(BundleError, match="format 3 is not supported"):
        load_bundle(write_bundle(tmp_path / "a", policy(format=3)))
    with pytest.raises(BundleError, match="5 outputs but policy.json lists 2 labels"):
        load_bundle(write_bundle(tmp_path / "b", policy(labels=["a", "b"])))


# A kNN detector over the bag model's embedding (its mean logit vector): one prototype per
# in-scope intent, so a message of words the model has never seen (a zero vector) is as far from
# all of them as it can be, and any vote for an intent is at cosine 1.
IN_SCOPE = [label for label in LABELS if label != "out_of_scope"]


def knn_detector(threshold: float = 0.5) -> dict:
    prototypes = np.eye(len(LABELS), dtype=np.float32)[[LABELS.index(x) for x in IN_SCOPE]]
    return {"kind": "knn", "threshold": threshold,
            "params": {"prototypes": pack(prototypes), "k": 1},
            "validation": {"false_rate": 0.02, "recall": None,
                           "in_scope": {"student_right": 0.9, "student_wrong": 0.03,
                                        "out_of_scope": 0.02, "teacher": 0.05},
                           "out_of_scope": None}}


def mahalanobis_detector(threshold: float = 4.0) -> dict:
    """Identity whitening, intent means at 3 on their own axis: "charged twice" (mean vote 3)
    sits on billing's mean, a message of unknown words (the origin) 9 from every mean."""
    means = 3 * np.eye(len(LABELS), dtype=np.float32)[[LABELS.index(x) for x in IN_SCOPE]]
    return {"kind": "mahalanobis", "threshold": threshold,
            "params": {"projection": pack(np.eye(len(LABELS))), "means": pack(means)},
            "validation": {}}


@pytest.fixture(scope="module")
def detecting(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    return load_bundle(write_bundle(root, policy(format=2, out_of_scope=knn_detector()),
                                    embedding=True), threads=1)


def test_a_message_like_nothing_trained_on_is_answered_out_of_scope(detecting):
    result = detecting.predict({"message": "write me a Python function that sorts a list"})
    assert result["route"] == "out_of_scope" and result["label"] == "out_of_scope"
    assert result["output"] == {"intent": "out_of_scope"}
    assert result["out_of_scope_score"] == pytest.approx(1.0)
    assert result["reason"] == "out of scope: knn score 1 > 0.5 (nearest intent billing)"


@pytest.mark.parametrize("message, route", [
    ("charged twice", "student"),        # an intent's own words: cosine 1, score 0
    ("sue me", "teacher"),               # a trigger comes first, whatever the score
    ("help contract", "refusal"),
    ("the crash", "teacher"),
])
def test_in_scope_messages_keep_their_routes_with_a_score(detecting, message, route):
    result = detecting.predict({"message": message})
    assert result["route"] == route
    assert 0.0 <= result["out_of_scope_score"] <= 1.0


def test_mahalanobis_detector_flags_the_far_message_only(tmp_path):
    bundle = load_bundle(write_bundle(tmp_path, policy(format=2, out_of_scope=mahalanobis_detector()),
                                      embedding=True))
    near, far = bundle.predict_batch([{"message": "charged twice"}, {"message": "hmm please"}])
    assert near["route"] == "student" and near["out_of_scope_score"] == pytest.approx(0.0, abs=1e-6)
    assert far["route"] == "out_of_scope" and far["out_of_scope_score"] == pytest.approx(9.0)


def test_format_1_bundles_without_embedding_still_load_and_never_answer_out_of_scope(bundle):
    assert bundle.policy.detector is None and not bundle.classifier.has_embedding
    result = bundle.predict({"message": "write me a Python function that sorts a list"})
    assert result["route"] == "teacher" and "out_of_scope_score" not in result


def test_a_detector_that_reads_embeddings_needs_the_embedding_output(tmp_path):
    with pytest.raises(BundleError, match="knn out-of-scope detector reads the pooled embedding"):
        load_bundle(write_bundle(tmp_path, policy(format=2, out_of_scope=knn_detector())))
    broken = {**knn_detector(), "kind": "lof"}
    with pytest.raises(BundleError, match="out_of_scope.kind 'lof' is not one of"):
        load_bundle(write_bundle(tmp_path / "b", policy(format=2, out_of_scope=broken),
                                 embedding=True))


def test_classifier_pads_each_batch_to_its_longest_member(bundle_dir):
    clf = OnnxClassifier(bundle_dir / "model.onnx", bundle_dir / "tokenizer.json", max_length=16)
    logits = clf.logits(["charged", "hmm hmm hmm charged", "password"], batch_size=2)
    assert logits.shape == (3, len(LABELS))
    assert logits[0, 0] == pytest.approx(6.0) and logits[1, 0] == pytest.approx(1.5)
    assert logits[2, 1] == pytest.approx(6.0)


def test_input_text():
    assert text_field_of({"properties": {"message": {"type": "string"}}}) == "message"
    assert text_field_of({"properties": {"a": {"type": "string"}, "b": {"type": "integer"}}}) is None
    assert input_text({"message": "hi"}, "message") == "hi"
    assert input_text({"b": 2, "a": "é"}, None) == '{"a":"é","b":2}'


def test_runtime_imports_neither_torch_nor_transformers(bundle_dir):
    code = (
        "import sys, distill_compiler.runtime as r\n"
        f"b = r.load_bundle({str(bundle_dir)!r})\n"
        "assert b.predict({'message': 'charged twice'})['label'] == 'billing'\n"
        "heavy = [m for m in ('torch', 'transformers', 'litellm') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
