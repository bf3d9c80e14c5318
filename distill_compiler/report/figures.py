"""How reports write numbers: percentages, figures and sizes, shared by the model card,
report.html and diff so the three never disagree on a value's text."""

from __future__ import annotations

from ..data.records import OUT_OF_SCOPE_FAR, OUT_OF_SCOPE_NEAR


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def int8_variant(parity: dict) -> str:
    """What the int8 search shipped (export's parity.json `int8`), as a clause to append to the
    quantization kind; empty for a model exported before the search or not int8."""
    int8 = parity.get("int8") or {}
    if not int8.get("variant"):
        return ""
    tried = ", ".join(f"{t['variant']} {pct(t['agreement'])}" for t in int8.get("tried", []))
    ms, fp32_ms = int8.get("latency_p50_ms"), int8.get("fp32_latency_p50_ms")
    against = f" against fp32 {num(fp32_ms, 2)} ms" if fp32_ms is not None else ""
    slower = ("; slower than fp32 on the compiling machine: `export.quantize: none` ships the "
              "fp32 graph" if ms is not None and fp32_ms is not None and ms > fp32_ms else "")
    return (f", variant {int8['variant']} (int8_mode {int8.get('mode', 'n/a')}; "
            f"batch-1 p50 {num(ms, 2)} ms{against} at export{slower}; tried {tried})")


def recall_by_cohort(test: dict) -> str:
    """`(near-domain probes 40.0%, far 95.0%)` from the out-of-scope test figures, or empty."""
    names = {OUT_OF_SCOPE_NEAR: "near-domain probes", OUT_OF_SCOPE_FAR: "far probes"}
    parts = [f"{names.get(c, c)} {pct(r)}" for c, r in (test.get("recall_by_cohort") or {}).items()]
    return f" ({', '.join(parts)})" if len(parts) > 1 else ""
