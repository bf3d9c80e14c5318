"""The edge runtime: load a compiled bundle and answer requests with the student, or route them on.

The leaf of the package: it imports onnxruntime, tokenizers, numpy, jsonschema and the standard
library, and nothing else of distill_compiler, so a service ships it with the bundle alone
(`pip install distill-compiler[runtime]`). The compiler imports the bundle formats from here
(`format`), never the other way round.

    format        file names, format numbers, manifest, policy shape, text field, errors
    classifier    ONNX encoder classifier and its routing policy (task classify)
    ood           out-of-distribution scores of the classifier's embedding and logits
    causal        decoder student and its policy (tasks extract and agent)
    decoder       greedy KV-cache decoding with schema-constrained masks
    constrained   the token mask of a schema or tool set (llguidance); enforceable: which
                  schemas it compiles, and where one fails
    chat_format   how a conversation becomes the decoder's text, and its output a message

Importing this package loads only `format` (standard library); onnxruntime loads with the
first bundle.
"""

from __future__ import annotations

from pathlib import Path

from .format import DECODER_TASKS, BundleError, InputError, read_policy, verify_manifest

__all__ = ["BundleError", "InputError", "load_bundle"]


def load_bundle(path: str | Path, threads: int | None = None, providers: list[str] | None = None):
    """Verify a bundle's checksums and load it: a classifier.Bundle, or for extract and agent a
    causal.CausalBundle. `threads` sets onnxruntime's intra-op threads."""
    root = Path(path)
    manifest = verify_manifest(root)
    data = read_policy(root)
    if data.get("task") in DECODER_TASKS:
        from .causal import load_causal

        return load_causal(root, data, manifest, threads)  # CPU: decoders run batch 1
    from .classifier import load_classifier

    return load_classifier(root, data, manifest, threads, providers)
