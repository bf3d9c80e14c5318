"""The bundle's formats, owned here and nowhere else: file names, format numbers, the manifest,
the shape of policy.json, the text a student reads from a request, and the runtime's errors.

Standard library only, so the compiler (which writes bundles) and the runtime (which reads
them) share one definition of each, and `distill` can catch a BundleError by type without
loading onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

POLICY_FORMAT = 1
# A classify policy of format 2 may carry an out-of-scope detector (`out_of_scope`, below); an
# older runtime must refuse it rather than answer out-of-scope traffic without the detector.
# Format 1 classify bundles (no detector) still load.
CLASSIFY_POLICY_FORMAT = 2
CLASSIFY_POLICY_FORMATS = (1, 2)
MANIFEST_FORMAT = 1
MODEL_FILE, TOKENIZER_FILE, POLICY_FILE, MANIFEST_FILE = (
    "model.onnx", "tokenizer.json", "policy.json", "manifest.json")
REPORT_FILE, CARD_FILE, HTML_FILE = "report.json", "MODEL_CARD.md", "report.html"
# What a decoder bundle adds: the chat format its prompts use and how to drive the KV-cache graph.
CHAT_FILE, DECODER_FILE = "chat.json", "decoder.json"
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, POLICY_FILE)
CLASSIFY_FILES = (MODEL_FILE, TOKENIZER_FILE, POLICY_FILE, REPORT_FILE, CARD_FILE, HTML_FILE)
DECODER_FILES = (CHAT_FILE, DECODER_FILE)
DECODER_TASKS = ("extract", "agent")
# The classifier graph's outputs: logits, and (from classify policy format 2) the pooled sentence
# embedding the head reads, which the out-of-scope detector scores. Not plain `embedding`: the
# torch exporter already names the token-embedding lookup's value that, and a graph output of the
# same name makes an invalid model.
LOGITS_OUTPUT, EMBEDDING_OUTPUT = "logits", "pooled_embedding"


def bundle_files(task: str) -> tuple[str, ...]:
    """Every file the manifest lists for a bundle of this task (manifest.json itself aside)."""
    return CLASSIFY_FILES + (DECODER_FILES if task in DECODER_TASKS else ())


class BundleError(Exception):
    """A bundle that cannot be loaded or a request it cannot answer; the message says why."""


class InputError(BundleError):
    """A request that does not match the bundle's input schema."""

    def __init__(self, message: str, path: str):
        super().__init__(f"invalid input at {path}: {message}")
        self.message, self.path = message, path


# --------------------------------------------------------------------------- text

def text_field_of(schema: dict) -> str | None:
    """The input schema's single string property (e.g. `message`), or None when there is not one."""
    props = schema.get("properties") or {}
    strings = [name for name, sub in props.items()
               if isinstance(sub, dict) and sub.get("type") == "string"]
    return strings[0] if len(props) == 1 and len(strings) == 1 else None


def input_text(input: dict, text_field: str | None) -> str:
    """The text the student reads: the text field, or canonical JSON of the whole input."""
    if text_field is not None:
        return str(input[text_field])
    return json.dumps(input, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class Trigger:
    pattern: re.Pattern
    reason: str


def routing_fields(escalation, refusals, teacher) -> dict:
    """The policy.json fields both students' policies share, from the spec's escalation,
    refusals and teacher sections: trigger patterns, refusal responses and where escalations
    go. The key stays in the environment variable `api_key_env` names. With
    teacher.deployments, escalations go to the first deployment: the server calls one model
    directly (it has no router)."""
    target = teacher.deployments[0] if teacher.deployments else teacher
    return {
        "triggers": [{"pattern": t.pattern, "reason": t.reason or t.pattern}
                     for t in escalation.triggers],
        "refusals": {r.name: r.response for r in refusals},
        "teacher": {"model": target.model, "api_base": target.api_base,
                    "api_key_env": target.api_key_env},
    }


def read_triggers(data: dict) -> tuple[Trigger, ...]:
    """policy.json's trigger patterns, compiled (re.error on a bad pattern)."""
    return tuple(Trigger(re.compile(t["pattern"]), t.get("reason") or t["pattern"])
                 for t in data.get("triggers", ()))


# --------------------------------------------------------------------------- out of scope

# What a classify policy's `out_of_scope` object holds. `kind` names the score (runtime/ood.py
# computes each); a request whose score is above `threshold` is answered `out_of_scope`.
# `params` holds the kind's arrays, each packed as {"dtype", "shape", "base64"} (little-endian),
# and `validation` the figures measured on validation when the threshold was fitted:
#   false_rate   share of in-scope queries flagged (the α the threshold was fitted to)
#   recall       share of out-of-scope queries flagged (null: the logs held none)
#   in_scope / out_of_scope   share of each population per outcome, for projecting the cascade
#                to another out-of-scope share (null out_of_scope: none to measure)
OOD_KINDS = ("mahalanobis", "knn", "energy", "max_prob")
OOD_PARAMS = {"mahalanobis": ("projection", "means"), "knn": ("prototypes",),
              "energy": (), "max_prob": ()}
OOD_OUTCOMES = ("student_right", "student_wrong", "out_of_scope", "teacher")


@dataclass(frozen=True)
class OutOfScope:
    kind: str
    threshold: float
    params: dict
    validation: dict


def out_of_scope_fields(kind: str, threshold: float, params: dict, validation: dict) -> dict:
    """policy.json's `out_of_scope` object, as `read_out_of_scope` reads it back."""
    return {"kind": kind, "threshold": threshold, "params": params, "validation": validation}


def read_out_of_scope(data: dict) -> OutOfScope | None:
    """The detector a classify policy carries, or None (format 1 policies carry none).
    ValueError/KeyError/TypeError when it is malformed."""
    section = data.get("out_of_scope")
    if section is None:
        return None
    kind = section["kind"]
    if kind not in OOD_KINDS:
        raise ValueError(f"out_of_scope.kind {kind!r} is not one of {', '.join(OOD_KINDS)}")
    params = dict(section.get("params") or {})
    missing = [name for name in OOD_PARAMS[kind] if name not in params]
    if missing:
        raise KeyError(f"out_of_scope.params lacks {', '.join(missing)}")
    return OutOfScope(kind, float(section["threshold"]), params, dict(section.get("validation") or {}))


def write_policy(path: Path, policy: dict) -> None:
    """policy.json as the runtime reads it. Key order is kept, not sorted: output and tool
    schemas list properties in the order constrained decoding emits them, which must stay the
    order the student was trained on."""
    path.write_text(json.dumps(policy, indent=2, ensure_ascii=False), encoding="utf-8")


def read_policy(root: Path) -> dict:
    try:
        data = json.loads((root / POLICY_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root}: no {POLICY_FILE}") from None
    except ValueError as exc:
        raise BundleError(f"{POLICY_FILE}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{POLICY_FILE}: not a JSON object")
    return data


# --------------------------------------------------------------------------- bundle

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_manifest(root: Path) -> dict:
    """Check a bundle before anything else reads it: a manifest of a format this runtime reads,
    every listed file inside the bundle (no `..`, no symlink out) with its sha256, and no file
    the manifest does not list. Returns the manifest."""
    root = Path(root)
    inside = root.resolve()
    manifest = _read_manifest(root, inside)
    files: dict[str, str] = manifest["files"]
    for name, expected in sorted(files.items()):
        path = _inside(root, inside, name)
        if not path.is_file():
            raise BundleError(f"{name}: missing from the bundle (listed in {MANIFEST_FILE})")
        if sha256_file(path) != expected:
            raise BundleError(f"{name}: sha256 does not match {MANIFEST_FILE}; the file was "
                              "modified or corrupted after the bundle was built")
    extra = sorted(set(_present(root)) - set(files) - {MANIFEST_FILE})
    if extra:
        raise BundleError(f"{', '.join(extra[:5])}: not listed in {MANIFEST_FILE}; the bundle "
                          "was changed after it was built (remove the extra files or rebuild)")
    return manifest


def _read_manifest(root: Path, inside: Path) -> dict:
    path = root / MANIFEST_FILE
    if path.is_symlink() and not path.resolve().is_relative_to(inside):
        raise BundleError(f"{MANIFEST_FILE}: a symlink that points out of the bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise BundleError(f"{root}: no {MANIFEST_FILE}; is this a bundle directory?") from None
    except KeyError:
        raise BundleError(f"{MANIFEST_FILE}: unreadable (it lists no `files`); rebuild the "
                          "bundle with `distill compile`") from None
    except (ValueError, TypeError, IndexError) as exc:
        raise BundleError(f"{MANIFEST_FILE}: unreadable ({type(exc).__name__}: {exc}); rebuild "
                          "the bundle with `distill compile`") from None
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_FORMAT:
        raise BundleError(f"{MANIFEST_FILE}: format {version} is newer than this runtime reads "
                          f"({MANIFEST_FORMAT}); upgrade distill-compiler[runtime]")
    if version != MANIFEST_FORMAT:
        raise BundleError(f"{MANIFEST_FILE}: format {version!r} is not supported "
                          f"(this runtime reads format {MANIFEST_FORMAT})")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{MANIFEST_FILE}: `files` must map file names to sha256 strings")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise BundleError(f"{MANIFEST_FILE}: does not list {', '.join(unlisted)}")
    return manifest


def _inside(root: Path, inside: Path, name: str) -> Path:
    """The path of a listed file, refused unless it stays in the bundle: a name with `..` or
    an absolute one, or a symlink whose target is elsewhere, would read another file."""
    parts = Path(name).parts
    if not name or "\x00" in name or Path(name).is_absolute() or ".." in parts:
        raise BundleError(f"{MANIFEST_FILE}: file name {name!r} leaves the bundle")
    path = root / name
    if not path.resolve().is_relative_to(inside):
        raise BundleError(f"{name}: a symlink that points out of the bundle (to "
                          f"{path.resolve()}); copy the file in instead")
    return path


def _present(root: Path) -> list[str]:
    """Every file and link in the bundle, as manifest names; symlinked folders are not entered."""
    found = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(root)
        links = [d for d in dirs if (Path(folder) / d).is_symlink()]
        found += [(base / n).as_posix() for n in [*names, *links]]
    return found


def manifest_dict(name: str, task: str, spec_sha256: str, files: dict[str, str],
                  versions: dict, created_from: dict) -> dict:
    """manifest.json: the sha256 of every other file, which verify_manifest checks on load."""
    return {"format": MANIFEST_FORMAT, "name": name, "task": task, "spec_sha256": spec_sha256,
            "files": files, "versions": versions, "created_from": created_from}


def check_inputs(policy, inputs: list) -> None:
    """Validate a batch before any of it runs; an error's path names the bad item (`$[2].x`)."""
    for i, item in enumerate(inputs):
        try:
            policy.check_input(item)
        except InputError as exc:
            if len(inputs) == 1:
                raise
            raise InputError(exc.message, f"$[{i}]{exc.path[1:]}") from None
