"""distill-compiler: compile a YAML task spec into a small student model and an edge bundle.

The public API is `load_spec`, `plan` and `build`, loaded on first use: importing the package,
or its edge runtime (`distill_compiler.runtime`), loads neither pydantic nor yaml, and torch,
transformers, litellm and onnxruntime load only inside the stages that need them.

    spec/      the task spec: models, loading with positions, checks, docs
    pipeline   the stages in order, cache keys, plan() and build()
    stages/    generate, curate, train, export, evaluate, bundle
    teacher/   litellm client, labels, request cache, log replay, prompts
    data/      the example record, PII scrub, augmentation
    students/  classifier/ and causal/ (train, export, evaluate), device, quantize
    metrics/   classify, structured, calibration, cascade
    runtime/   the edge runtime, a leaf: bundle formats, classifier, causal decoder
    serve/     the OpenAI-compatible server
    report/    model card, report.html, diff
"""

from __future__ import annotations

import os

# litellm fetches its model-price map from the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
__all__ = ["Project", "Spec", "__version__", "build", "load_spec", "plan"]
_API = {"Project": "pipeline", "build": "pipeline", "plan": "pipeline",
        "Spec": "spec", "load_spec": "spec"}


def __getattr__(name: str):
    """`distill_compiler.load_spec` and the rest, imported when first asked for."""
    if name not in _API:
        raise AttributeError(f"module 'distill_compiler' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_API[name]}", __name__), name)
