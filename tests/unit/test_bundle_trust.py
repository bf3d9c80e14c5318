"""Bundles from elsewhere: each way a copied, edited or crafted bundle can differ from what was
built is refused by name, and loading never opens a file outside the bundle directory (an
audit hook records every `open` Python makes while a bundle loads)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_runtime import policy, write_bundle

from distill_compiler.runtime import load_bundle
from distill_compiler.runtime.format import BundleError, sha256_file

OPENED: list[str] | None = None


def _record_opens(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; it records only when asked


@contextmanager
def opens():
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


def relist(root: Path, **changes) -> None:
    """Rewrite manifest.json with `changes` applied (files re-hashed unless given)."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(root / n) for n in manifest["files"] if (root / n).exists()}
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def refused(root: Path, message: str) -> None:
    with opens() as opened, pytest.raises(BundleError, match=message):
        load_bundle(root)
    inside = str(root.resolve())
    outside = [p for p in opened if not str(Path(p).resolve()).startswith(inside)
               and not p.startswith(sys.prefix) and not p.endswith((".py", ".pyc", ".so"))]
    assert not outside, f"read outside the bundle: {outside}"


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", policy())


def test_a_clean_bundle_loads_reading_only_inside_it(bundle):
    with opens() as opened:
        load_bundle(bundle)
    assert {Path(p).name for p in opened if str(bundle) in p} >= {"manifest.json", "policy.json"}


def test_a_newer_manifest_format_is_refused_with_what_to_do(bundle):
    relist(bundle, format=2)
    refused(bundle, r"manifest\.json: format 2 is newer than this runtime reads \(1\); upgrade")


def test_a_missing_file_is_named(bundle):
    (bundle / "tokenizer.json").unlink()
    refused(bundle, r"^tokenizer\.json: missing from the bundle")


def test_an_extra_unlisted_file_is_named(bundle):
    (bundle / "notes.txt").write_text("added later")
    refused(bundle, r"^notes\.txt: not listed in manifest\.json")
    (bundle / "notes.txt").unlink()
    (bundle / "sub").mkdir()
    (bundle / "sub" / "x.bin").write_bytes(b"\0")
    refused(bundle, r"^sub/x\.bin: not listed")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/../../secret", "a\x00b",
                                  ""])
def test_a_manifest_path_outside_the_bundle_is_refused(bundle, name):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused(bundle, "leaves the bundle")


def test_a_symlink_out_of_the_bundle_is_refused_even_with_the_right_hash(bundle, tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes((bundle / "tokenizer.json").read_bytes())
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(elsewhere)
    refused(bundle, r"^tokenizer\.json: a symlink that points out of the bundle")


def test_a_manifest_symlinked_from_elsewhere_is_refused(bundle, tmp_path):
    elsewhere = tmp_path / "manifest.json"
    elsewhere.write_text((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(elsewhere)
    refused(bundle, r"^manifest\.json: a symlink that points out of the bundle")


@pytest.mark.parametrize("files", [["model.onnx"], {"model.onnx": 5}, "x", None])
def test_a_malformed_file_list_is_refused(bundle, files):
    relist(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = files
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused(bundle, r"manifest\.json: `files` must map file names to sha256 strings")


def test_a_manifest_that_is_not_an_object_is_refused(bundle):
    (bundle / "manifest.json").write_text("[1, 2]")
    refused(bundle, r"manifest\.json: unreadable")
