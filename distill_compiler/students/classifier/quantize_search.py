"""Find an int8 variant of the exported classifier that meets the parity gate by itself.

Dynamic int8 re-quantizes every activation at run time and, on a model whose classes sit close
together, flips a few answers (a 50-intent banking spec: 98.6 % agreement against a 99 % gate).
Rather than hand the user that search, export tries variants in order of expected speed and
ships the first (in `auto`: the faster of the first dynamic and first static) that meets
`export.min_parity`:

1. the family defaults: dynamic per-channel int8; static QDQ int8 calibrated (MinMax) on a
   sample of the training split;
2. the same families with more headroom: dynamic with reduce_range (7-bit weights), static with
   Percentile calibration (outliers clipped);
3. the best of those with the MatMuls whose quantization moves the logits most kept in fp32,
   one more at a time, at most MAX_FP32_MATMULS;
4. (dynamic and auto) blockwise int8: weights and run-time activation scales per block of 32
   values (MatMulNBits, 8 bits). Slower than dynamic int8 where measured, but its errors do
   not add up across 36 MatMuls the way one scale per tensor does: on a 50-intent banking
   spec dynamic agreed on 98.6 % and no single MatMul kept in fp32 raised it past 98.75 %
   (each one left out in turn), while blockwise agreed on 99.4 %.

`int8_mode` picks the families: dynamic, static, or auto (both; the faster on this machine
first). The search itself knows nothing of tokenizers or torch: it gets a function that
returns validation logits for a graph and one that times graphs side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..quantize import (
    quantize,
    quantize_blockwise_int8,
    quantize_static_int8,
    weight_matmuls,
)
from ..quiet import quiet_export

# Each MatMul kept in fp32 gives back part of the int8 speed-up; past a handful (MiniLM-L6 has
# 36 weight MatMuls) fp32 export is the honest answer, and each step costs a parity run.
MAX_FP32_MATMULS = 8
# The per-node sensitivity is a ranking, not a gate: a slice of validation ranks as well as
# all of it, at a fraction of the cost (one run per weight MatMul).
SENSITIVITY_EXAMPLES = 128


@dataclass(frozen=True)
class Variant:
    mode: str  # dynamic | static | blockwise
    reduce_range: bool = False  # dynamic: 7-bit weights
    calibration: str = "minmax"  # static: minmax | percentile
    keep_fp32: tuple[str, ...] = ()  # MatMuls left unquantized

    @property
    def name(self) -> str:
        base = {"dynamic": "dynamic-reduce-range" if self.reduce_range else "dynamic",
                "static": f"static-{self.calibration}", "blockwise": "blockwise"}[self.mode]
        return f"{base}+fp32x{len(self.keep_fp32)}" if self.keep_fp32 else base


# Per family: the default first, then the variant with more accuracy headroom.
FAMILIES = {
    "dynamic": (Variant("dynamic"), Variant("dynamic", reduce_range=True)),
    "static": (Variant("static"), Variant("static", calibration="percentile")),
}
MODES = {"auto": ("dynamic", "static"), "dynamic": ("dynamic",), "static": ("static",)}
# What is left when neither family nor fp32 MatMuls meet the gate; blockwise quantizes
# activations at run time, so `int8_mode: static` does not get it.
LAST_RESORT = {"auto": (Variant("blockwise"),), "dynamic": (Variant("blockwise"),), "static": ()}


@dataclass
class Trial:
    variant: Variant
    path: Path
    agreement: float
    latency_ms: float | None = None

    def record(self) -> dict:
        return {"variant": self.variant.name, "agreement": round(self.agreement, 4),
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
                "fp32_matmuls": list(self.variant.keep_fp32)}


@dataclass
class Search:
    """The inputs of one search. `logits_of(path, n)`: logits of the graph at `path` on the first
    `n` validation texts (all when None); `latency_of(paths)`: batch-1 p50 ms of each graph,
    measured side by side; `calibration(method)`: fresh feeds for static calibration."""

    fp32: Path
    workdir: Path
    reference: np.ndarray  # argmax the shipped graph must reproduce (the trained model's)
    logits_of: Callable[[Path, int | None], np.ndarray]
    latency_of: Callable[[Sequence[Path]], list[float]]
    calibration: Callable[[str], Iterable[dict]]
    min_parity: float
    log: Callable[[str], None] = lambda _: None
    tried: list[Trial] = field(default_factory=list)
    fp32_latency_ms: float | None = None  # timed beside the variant that ships

    def build(self, variant: Variant, out: Path, only: Sequence[str] | None = None) -> Path:
        with quiet_export():
            if variant.mode == "dynamic":
                quantize(self.fp32, out, "int8", reduce_range=variant.reduce_range,
                         keep_fp32=variant.keep_fp32, only=only)
            elif variant.mode == "blockwise":
                quantize_blockwise_int8(self.fp32, out, keep_fp32=variant.keep_fp32, only=only)
            else:
                cache = self.workdir / f"calibration-{variant.calibration}.json"
                quantize_static_int8(self.fp32, out, self.calibration(variant.calibration),
                                     variant.calibration, cache, keep_fp32=variant.keep_fp32,
                                     only=only)
        return out

    def attempt(self, variant: Variant) -> Trial:
        path = self.build(variant, self.workdir / f"{variant.name}.onnx")
        agreement = float((self.logits_of(path, None).argmax(-1) == self.reference).mean())
        trial = Trial(variant, path, agreement)
        self.tried.append(trial)
        self.log(f"export: int8 {variant.name} agrees on {agreement:.1%} "
                 f"(gate {self.min_parity:.1%})")
        return trial

    def passes(self, trial: Trial) -> bool:
        return trial.agreement >= self.min_parity

    def time(self, trials: Sequence[Trial]) -> None:
        for trial, ms in zip(trials, self.latency_of([t.path for t in trials])):
            trial.latency_ms = ms

    def sensitivity(self, variant: Variant) -> list[str]:
        """Weight MatMuls by how far quantizing that one node alone (as `variant` would) moves
        the logits from fp32's, most first, on a slice of validation."""
        n = min(SENSITIVITY_EXAMPLES, len(self.reference))
        base = self.logits_of(self.fp32, n)
        shifts = {}
        for node in weight_matmuls(self.fp32):
            path = self.build(variant, self.workdir / "sensitivity.onnx", only=[node])
            shifts[node] = float(np.abs(self.logits_of(path, n) - base).mean())
        return sorted(shifts, key=shifts.__getitem__, reverse=True)


def search_int8(search: Search, mode: str) -> Trial | None:
    """The trial to ship, or None when no variant meets the gate (`search.tried` says what was
    tried). Latency is measured for the trials the choice depends on and for the one shipped."""
    families = list(MODES[mode])
    firsts = [search.attempt(FAMILIES[f][0]) for f in families]
    if len(firsts) > 1:
        # Time the families side by side even when one fails the gate: the order of the rest
        # of the search is the speed order on this machine.
        search.time(firsts)
        search.log("export: batch-1 p50 " + ", ".join(f"{t.variant.name} {t.latency_ms:.2f} ms"
                                                      for t in firsts))
        firsts, families = zip(*sorted(zip(firsts, families), key=lambda p: p[0].latency_ms))
    passing = [t for t in firsts if search.passes(t)]
    if passing:
        return ship(search, passing[0])
    for family in families:
        for variant in FAMILIES[family][1:]:
            trial = search.attempt(variant)
            if search.passes(trial):
                return ship(search, trial)
    best = max(search.tried, key=lambda t: t.agreement)  # ties: the earlier, faster one
    search.log(f"export: ranking MatMuls by how far int8 moves the logits ({best.variant.name})")
    ranked = search.sensitivity(best.variant)
    for k in range(1, min(MAX_FP32_MATMULS, len(ranked)) + 1):
        trial = search.attempt(replace(best.variant, keep_fp32=tuple(ranked[:k])))
        if search.passes(trial):
            return ship(search, trial)
    for variant in LAST_RESORT[mode]:
        trial = search.attempt(variant)
        if search.passes(trial):
            return ship(search, trial)
    return None


def ship(search: Search, trial: Trial) -> Trial:
    """`trial`, timed side by side with the fp32 graph: where int8 has no fast kernels (or a
    variant keeps many MatMuls in fp32, or quantizes blockwise) it can be the slower of the two,
    and the user who asked for int8 for speed should hear it."""
    trial.latency_ms, search.fp32_latency_ms = search.latency_of([trial.path, search.fp32])
    if trial.latency_ms > search.fp32_latency_ms:
        search.log(f"export: int8 {trial.variant.name} is slower than fp32 on this machine "
                   f"({trial.latency_ms:.2f} against {search.fp32_latency_ms:.2f} ms p50 at "
                   "batch 1); export.quantize: none ships the fp32 graph, 4x larger")
    return trial
