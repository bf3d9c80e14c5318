"""The classifier runtime: an ONNX encoder classifier and the policy that routes its labels.

    bundle = load_bundle("build/harbor-support-router/bundle")
    bundle.predict({"message": "I was charged twice"})
    # {"output": {"intent": "billing"}, "label": "billing", "confidence": 0.97,
    #  "route": "student", "reason": "confidence 0.97 >= 0.63"}

Routes, first match wins: a trigger pattern sends the request to the teacher before the
student's answer counts; an out-of-distribution score above the bundle's detector threshold
answers `out_of_scope` (route `out_of_scope`: the request is like nothing the student was
trained on, so neither its label nor its confidence means anything); a predicted refusal label returns the refusal's fixed response; a
predicted always-escalate intent goes to the teacher; a calibrated confidence under the
threshold goes to the teacher; anything else is the student's answer.

The compiler's evaluation runs the shipped model through `OnnxClassifier` and routes through
`Policy`, so the thresholds it fits are the ones this file applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .format import (
    CLASSIFY_POLICY_FORMATS,
    EMBEDDING_OUTPUT,
    LOGITS_OUTPUT,
    MODEL_FILE,
    POLICY_FILE,
    TOKENIZER_FILE,
    BundleError,
    Trigger,
    check_inputs,
    input_text,
    read_out_of_scope,
    read_triggers,
)
from .inputs import check_text, check_values, schema_error
from .ood import Detector

# Candidate pad tokens when tokenizer.json carries no padding config. The attention mask hides
# padded positions, so any id would do; a real pad token just keeps the inputs conventional.
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- model

def session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, always with CPU behind it."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxClassifier:
    """An ONNX sequence classifier and its tokenizer: texts in, logits out."""

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_length: int,
                 threads: int | None = None, providers: list[str] | None = None):
        self.session = ort.InferenceSession(str(model_path), session_options(threads),
                                            providers=providers or default_providers())
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # Padding is done here per batch (to the longest member), not by the tokenizer.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pad_id = self._pad_id()
        self.feeds = {i.name: (np.int32 if i.type == "tensor(int32)" else np.int64)
                      for i in self.session.get_inputs()}
        names = [o.name for o in self.session.get_outputs()]
        # Graphs exported before the embedding output have logits alone (and maybe another name).
        self.output_names = [LOGITS_OUTPUT if LOGITS_OUTPUT in names else names[0]]
        self.has_embedding = EMBEDDING_OUTPUT in names
        if self.has_embedding:
            self.output_names.append(EMBEDDING_OUTPUT)

    def _pad_id(self) -> int:
        padding = self.tokenizer.padding
        if padding:
            return padding["pad_id"]
        ids = (self.tokenizer.token_to_id(t) for t in PAD_TOKENS)
        return next((i for i in ids if i is not None), 0)

    def logits(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Logits for each text, in order."""
        return self.outputs(texts, batch_size)[0]

    def outputs(self, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, pooled embeddings or None when the graph has no embedding output) for each
        text, in order. Texts are batched by length so padding stays short."""
        if not texts:
            return self._empty(LOGITS_OUTPUT), (self._empty(EMBEDDING_OUTPUT)
                                                if self.has_embedding else None)
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = [[None] * len(texts) for _ in self.output_names]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            results = self._run([encodings[i] for i in chunk])
            for rows, column in zip(results, out):
                for i, row in zip(chunk, rows):
                    column[i] = row
        stacked = [np.stack(column) for column in out]
        return stacked[0], (stacked[1] if self.has_embedding else None)

    def _empty(self, name: str) -> np.ndarray:
        outputs = {o.name: o for o in self.session.get_outputs()}
        n = (outputs.get(name) or self.session.get_outputs()[0]).shape[-1]
        return np.zeros((0, n if isinstance(n, int) else 0), dtype=np.float32)

    def _run(self, encodings: list) -> list[np.ndarray]:
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        missing = [name for name in self.feeds if name not in arrays]
        if missing:
            raise BundleError(f"{MODEL_FILE}: unexpected model inputs {missing}; "
                              "expected input_ids, attention_mask and optionally token_type_ids")
        feed = {name: arrays[name].astype(dtype) for name, dtype in self.feeds.items()}
        return self.session.run(self.output_names, feed)


@dataclass(frozen=True)
class Decision:
    label: str
    confidence: float
    route: str  # "student" | "teacher" | "refusal" | "out_of_scope"
    reason: str
    # which rule decided: trigger | out_of_scope | refusal | always | low_confidence | confident
    rule: str
    score: float | None = None  # the out-of-distribution score, when the bundle has a detector


class Policy:
    """What policy.json says the runtime does with a request and the student's probabilities."""

    def __init__(self, data: dict):
        if data.get("format") not in CLASSIFY_POLICY_FORMATS:
            raise BundleError(f"{POLICY_FILE}: format {data.get('format')!r} is not supported "
                              f"(this runtime reads classify formats "
                              f"{', '.join(map(str, CLASSIFY_POLICY_FORMATS))})")
        if data.get("task") != "classify":
            raise BundleError(f"{POLICY_FILE}: task {data.get('task')!r} is not supported by this "
                              "runtime (classify only)")
        try:
            self.labels: list[str] = list(data["labels"])
            self.input_schema: dict = data["input_schema"]
            self.text_field: str | None = data.get("text_field")
            self.max_length = int(data["max_length"])
            self.temperature = float(data.get("temperature", 1.0))
            self.threshold = float(data.get("threshold", 0.0))
            self.always_escalate = frozenset(data.get("always_escalate", ()))
            self.refusals: dict[str, str] = dict(data.get("refusals", {}))
            self.triggers = read_triggers(data)
            self.out_of_scope_label = str(data.get("out_of_scope_label") or "out_of_scope")
            section = read_out_of_scope(data)
            self.detector = None if section is None else Detector(section, self.temperature)
        except (KeyError, TypeError, ValueError, re.error) as exc:
            raise BundleError(f"{POLICY_FILE}: malformed policy ({type(exc).__name__}: {exc})") from None
        self.data = data
        validator_cls = jsonschema.validators.validator_for(self.input_schema,
                                                            default=jsonschema.Draft202012Validator)
        self.validator = validator_cls(self.input_schema)

    def check_input(self, input: Any) -> None:
        """Refuse, as InputError, anything the model cannot be asked: see runtime/inputs.py."""
        check_values(input)
        error = schema_error(self.validator, input)
        if error is not None:
            raise error
        if self.text_field is not None:
            check_text(input.get(self.text_field), f"$.{self.text_field}")

    def text(self, input: dict) -> str:
        return input_text(input, self.text_field)

    def trigger(self, text: str) -> Trigger | None:
        return next((t for t in self.triggers if t.pattern.search(text)), None)

    def decide(self, text: str, probs: np.ndarray, score: float | None = None) -> Decision:
        """Route one request given its text, the student's calibrated probabilities and, when
        the bundle has a detector, its out-of-distribution score."""
        top = int(np.argmax(probs))
        label, confidence = self.labels[top], float(probs[top])
        trigger = self.trigger(text)
        if trigger is not None:
            return Decision(label, confidence, "teacher", f"trigger: {trigger.reason}", "trigger",
                            score)
        detector = self.detector
        if detector is not None and score is not None and detector.flags(score):
            return Decision(self.out_of_scope_label, confidence, "out_of_scope",
                            f"out of scope: {detector.kind} score {score:.4g} > "
                            f"{detector.threshold:.4g} (nearest intent {label})", "out_of_scope",
                            score)
        if label in self.refusals:
            return Decision(label, confidence, "refusal", f"refusal: {label}", "refusal", score)
        if label in self.always_escalate:
            return Decision(label, confidence, "teacher", f"always escalate: {label}", "always",
                            score)
        if confidence < self.threshold:
            return Decision(label, confidence, "teacher",
                            f"low confidence {confidence:.2f} < {self.threshold:.2f}",
                            "low_confidence", score)
        return Decision(label, confidence, "student",
                        f"confidence {confidence:.2f} >= {self.threshold:.2f}", "confident", score)

    def scores(self, logits: np.ndarray, embeddings: np.ndarray | None) -> list[float | None]:
        """Each request's out-of-distribution score (None for all without a detector)."""
        if self.detector is None or len(logits) == 0:
            return [None] * len(logits)
        return [float(x) for x in self.detector.score(logits, embeddings)]

    def output(self, decision: Decision) -> dict:
        if decision.route == "refusal":
            return {"intent": decision.label, "response": self.refusals[decision.label]}
        return {"intent": decision.label}


class Bundle:
    """A loaded bundle: the classifier, its policy, and the manifest it was verified against."""

    def __init__(self, root: Path, policy: Policy, classifier: OnnxClassifier, manifest: dict):
        self.root, self.policy, self.classifier, self.manifest = root, policy, classifier, manifest

    @property
    def labels(self) -> list[str]:
        return self.policy.labels

    def predict(self, input: dict, probs: bool = False) -> dict:
        return self.predict_batch([input], probs=probs)[0]

    def predict_batch(self, inputs: list[dict], probs: bool = False) -> list[dict]:
        """Answer each request; one invalid input rejects the batch (InputError says which)."""
        check_inputs(self.policy, inputs)
        texts = [self.policy.text(item) for item in inputs]
        logits, embeddings = self.classifier.outputs(texts)
        all_probs = softmax(logits, self.policy.temperature)
        results = []
        for text, p, score in zip(texts, all_probs, self.policy.scores(logits, embeddings)):
            decision = self.policy.decide(text, p, score)
            result = {"output": self.policy.output(decision), "label": decision.label,
                      "confidence": decision.confidence, "route": decision.route,
                      "reason": decision.reason}
            if score is not None:
                result["out_of_scope_score"] = score
            if probs:
                result["probs"] = {label: float(x) for label, x in zip(self.policy.labels, p)}
            results.append(result)
        return results


def load_classifier(root: Path, policy_data: dict, manifest: dict, threads: int | None = None,
                    providers: list[str] | None = None) -> Bundle:
    policy = Policy(policy_data)
    try:
        classifier = OnnxClassifier(root / MODEL_FILE, root / TOKENIZER_FILE, policy.max_length,
                                    threads, providers)
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime and tokenizers raise their own untyped errors
        raise BundleError(f"cannot load the model or tokenizer: {exc}") from exc
    n_out = classifier.session.get_outputs()[0].shape[-1]
    if isinstance(n_out, int) and n_out != len(policy.labels):
        raise BundleError(f"{MODEL_FILE} has {n_out} outputs but {POLICY_FILE} lists "
                          f"{len(policy.labels)} labels")
    if policy.detector is not None and policy.detector.needs_embedding and not classifier.has_embedding:
        raise BundleError(f"{POLICY_FILE}: the {policy.detector.kind} out-of-scope detector reads "
                          f"the pooled embedding, but {MODEL_FILE} has no `{EMBEDDING_OUTPUT}` output")
    return Bundle(root, policy, classifier, manifest)
