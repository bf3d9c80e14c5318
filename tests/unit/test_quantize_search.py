import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import stage_context, tiny_spec
from tiny_models import classify_examples

from distill_compiler.data.records import read_jsonl
from distill_compiler.errors import StageError
from distill_compiler.runtime.classifier import OnnxClassifier
from distill_compiler.runtime.format import input_text
from distill_compiler.stages import export
from distill_compiler.students.classifier.export import calibration_feeds, under
from distill_compiler.students.classifier.quantize_search import (
    MAX_FP32_MATMULS,
    Search,
    Variant,
    search_int8,
)
from distill_compiler.students.quantize import (
    quantize_blockwise_int8,
    quantize_static_int8,
    weight_matmuls,
)


def texts(path: Path) -> list[str]:
    return [input_text(r["input"], None) for r in read_jsonl(path)]


# --------------------------------------------------------------------------- the real graphs

@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_static_qdq_runs_and_mostly_agrees_with_fp32(tmp_path, exported_classifier,
                                                     classify_splits, method):
    fp32 = exported_classifier / "model.fp32.onnx"
    runner = OnnxClassifier(fp32, exported_classifier / "tokenizer.json", 32)
    out = tmp_path / "static.onnx"
    cache = tmp_path / "ranges.json"
    quantize_static_int8(fp32, out, calibration_feeds(runner, texts(classify_splits / "train.jsonl"),
                                                      method), method, cache)
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # The head stays float: the node computing `logits` reads no dequantized weight.
    weights = {t.name: t.data_type for t in graph.initializer}
    head = next(n for n in graph.node if "logits" in n.output)
    assert all(weights.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in head.input)
    assert cache.is_file()  # the ranges are saved for the next variant

    held_out = [t for t, _ in classify_examples(10, offset=40)]
    expected = runner.logits(held_out).argmax(-1)
    got = OnnxClassifier(out, exported_classifier / "tokenizer.json", 32).logits(held_out)
    assert (got.argmax(-1) == expected).mean() >= 0.8
    # A second variant from the cached ranges, with one MatMul kept in fp32, needs no feeds.
    kept = weight_matmuls(fp32)[0]
    quantize_static_int8(fp32, tmp_path / "kept.onnx", iter(()), method, cache, keep_fp32=[kept])
    ort.InferenceSession(str(tmp_path / "kept.onnx"))
    graph = onnx.load(str(tmp_path / "kept.onnx")).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    kept_node = next(n for n in graph.node if n.name == kept)
    assert any(i in floats for i in kept_node.input)  # its weight is stored in fp32


def test_blockwise_int8_runs_and_mostly_agrees_with_fp32(tmp_path, exported_classifier):
    fp32 = exported_classifier / "model.fp32.onnx"
    out = tmp_path / "blockwise.onnx"
    quantize_blockwise_int8(fp32, out)
    graph = onnx.load(str(out)).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == len(weight_matmuls(fp32))
    producer = {o: n for n in graph.node for o in n.output}
    head = producer["logits"]  # the Gemm, split into MatMul + Add by the Gather pass, stays fp32
    assert head.op_type == "Add" and producer[head.input[0]].op_type == "MatMul"
    assert [p.name for p in tmp_path.iterdir()] == ["blockwise.onnx"]
    held_out = [t for t, _ in classify_examples(10, offset=40)]
    tokenizer = exported_classifier / "tokenizer.json"
    expected = OnnxClassifier(fp32, tokenizer, 32).logits(held_out).argmax(-1)
    got = OnnxClassifier(out, tokenizer, 32).logits(held_out).argmax(-1)
    assert (got == expected).mean() >= 0.8


def test_a_gate_of_one_forces_the_search_and_records_what_shipped(tmp_path, trained_classifier,
                                                                  classify_splits):
    # At min_parity 1.0 every variant must reproduce all 24 validation answers: whichever ships
    # meets it, or the stage fails naming every variant it tried.
    spec = tiny_spec(export={"quantize": "int8", "max_length": 32, "min_parity": 1.0})
    ctx = stage_context("export", tmp_path / "out",
                        {"train": trained_classifier, "curate": classify_splits}, spec)
    try:
        summary = export.run(ctx)
    except StageError as err:
        parity = json.loads((tmp_path / "out" / "parity.json").read_text())
        assert parity["int8"]["variant"] is None
        for trial in parity["int8"]["tried"]:
            assert f"{trial['variant']} {under(trial['agreement'], 1.0)}" in str(err)
        return
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    int8 = parity["int8"]
    assert int8["mode"] == "auto" and int8["variant"] == summary["int8_variant"]
    assert parity["agreement_shipped"] == 1.0 and int8["latency_p50_ms"] > 0
    tried = [t["variant"] for t in int8["tried"]]
    assert tried[:2] == ["dynamic", "static-minmax"] and int8["variant"] in tried
    assert not any(p.name.startswith(("dynamic", "static")) for p in (tmp_path / "out").iterdir())


# --------------------------------------------------------------------------- the search's order

class ScriptedSearch(Search):
    """Search with the graphs replaced by names: each variant's agreement and latency come from
    a table, so the order of the search is tested without quantizing anything."""

    def __init__(self, agreement: dict, latency: dict, ranking=("m3", "m1", "m2")):
        self.table, self.speed, self.ranking = agreement, latency, list(ranking)
        reference = np.zeros(100, dtype=int)
        super().__init__(Path("fp32.onnx"), Path("."), reference, self.logits, self.latency,
                         lambda method: iter(()), 0.99)

    def build(self, variant: Variant, out: Path, only=None) -> Path:
        return out

    def logits(self, path: Path, n):
        agree = round(self.table.get(path.stem, 0.5) * 100)
        logits = np.zeros((100, 2))
        logits[agree:, 1] = 1.0  # rows past `agree` pick class 1 instead of the reference's 0
        return logits

    def latency(self, paths):
        return [self.speed.get(p.stem.split("+")[0], 9.0) for p in paths]

    def sensitivity(self, variant: Variant) -> list[str]:
        return self.ranking


def names(search: Search) -> list[str]:
    return [t.variant.name for t in search.tried]


def test_auto_ships_the_faster_family_when_both_pass():
    search = ScriptedSearch({"dynamic": 0.99, "static-minmax": 1.0},
                            {"dynamic": 5.0, "static-minmax": 3.0})
    shipped = search_int8(search, "auto")
    assert shipped.variant.name == "static-minmax" and shipped.latency_ms == 3.0
    assert names(search) == ["dynamic", "static-minmax"]


def test_auto_ships_the_slower_family_when_only_it_passes():
    search = ScriptedSearch({"dynamic": 0.995, "static-minmax": 0.98},
                            {"dynamic": 5.0, "static-minmax": 3.0})
    assert search_int8(search, "auto").variant.name == "dynamic"


def test_the_faster_family_is_searched_further_first():
    search = ScriptedSearch({"dynamic-reduce-range": 0.99, "static-percentile": 0.99},
                            {"dynamic": 5.0, "static-minmax": 3.0})
    assert search_int8(search, "auto").variant.name == "static-percentile"
    assert names(search) == ["dynamic", "static-minmax", "static-percentile"]


def test_dynamic_mode_never_calibrates():
    search = ScriptedSearch({"dynamic-reduce-range": 0.99}, {})
    shipped = search_int8(search, "dynamic")
    assert names(search) == ["dynamic", "dynamic-reduce-range"]
    assert shipped.latency_ms == 9.0  # timed once it ships


def test_sensitive_matmuls_are_kept_in_fp32_one_at_a_time_from_the_best_variant():
    search = ScriptedSearch({"dynamic": 0.97, "static-minmax": 0.98, "static-percentile": 0.96,
                             "static-minmax+fp32x2": 0.99}, {"dynamic": 5.0, "static-minmax": 3.0})
    shipped = search_int8(search, "auto")
    assert shipped.variant.keep_fp32 == ("m3", "m1") and shipped.variant.calibration == "minmax"
    assert names(search)[-2:] == ["static-minmax+fp32x1", "static-minmax+fp32x2"]


def test_the_search_gives_up_after_the_cap():
    search = ScriptedSearch({}, {}, ranking=[f"m{i}" for i in range(20)])
    assert search_int8(search, "static") is None
    assert names(search)[-1] == f"static-minmax+fp32x{MAX_FP32_MATMULS}"
    assert len(search.tried) == 2 + MAX_FP32_MATMULS


def test_blockwise_is_the_last_resort_of_the_dynamic_modes_only():
    search = ScriptedSearch({"blockwise": 0.995}, {}, ranking=[f"m{i}" for i in range(20)])
    shipped = search_int8(search, "dynamic")
    assert shipped.variant.name == "blockwise"
    assert names(search)[-2:] == [f"dynamic+fp32x{MAX_FP32_MATMULS}", "blockwise"]
    search = ScriptedSearch({"blockwise": 0.995}, {})
    assert search_int8(search, "static") is None and "blockwise" not in names(search)


def test_the_shipped_variant_is_timed_beside_fp32_and_a_slower_one_is_said():
    from distill_compiler.report.figures import int8_variant

    logged = []
    search = ScriptedSearch({"blockwise": 0.995}, {"blockwise": 12.0, "fp32": 10.0},
                            ranking=[f"m{i}" for i in range(20)])
    search.log = logged.append
    shipped = search_int8(search, "dynamic")
    assert (shipped.latency_ms, search.fp32_latency_ms) == (12.0, 10.0)
    assert "int8 blockwise is slower than fp32 on this machine (12.00 against 10.00" in logged[-1]
    clause = int8_variant({"int8": {"variant": "blockwise", "mode": "dynamic",
                                    "latency_p50_ms": 12.0, "fp32_latency_p50_ms": 10.0}})
    assert "12.00 ms against fp32 10.00 ms at export; slower than fp32" in clause

    search = ScriptedSearch({"dynamic": 1.0}, {"dynamic": 3.0, "fp32": 10.0})
    search.log = logged.append
    search_int8(search, "dynamic")
    assert search.fp32_latency_ms == 10.0 and "slower" not in logged[-1]
