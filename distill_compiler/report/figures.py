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


def pool_selection(generate: dict) -> str:
    """`3000 of 9,981 pool requests labelled (active, 12 rounds: ...)` from generate's stats, or
    empty when the spec has no `teacher.pool`."""
    pool = generate.get("pool")
    if not pool:
        return ""
    rounds = pool.get("rounds") or []
    kinds: dict[str, int] = {}
    for r in rounds:
        kinds[r["by"]] = kinds.get(r["by"], 0) + r["selected"]
    agreement = [r["model_heldout_agreement"] for r in rounds
                 if r.get("model_heldout_agreement") is not None]
    model = (f"; the round model's held-out agreement {pct(agreement[0])} → {pct(agreement[-1])}"
             if len(agreement) > 1 else "")
    stopped = f"; stopped early: {pool['stopped']}" if pool.get("stopped") else ""
    by = ", ".join(f"{kind} {n}" for kind, n in kinds.items())
    return (f"{pool['labelled']} of {pool['pool']:,} pool requests labelled ({pool['selection']}, "
            f"{len(rounds)} round{'s' if len(rounds) != 1 else ''}: {by}{model}{stopped})")


def failure_rounds(generate: dict) -> str:
    """`2 failure rounds: 80 examples added around 4 clusters (refund/billing 30, ...); held-out
    agreement 81.0% → 84.5%; stopped: ...` from generate's stats, or empty."""
    rounds = (generate.get("failure_rounds") or {}).get("rounds") or []
    if not rounds:
        return ""
    added: dict[str, int] = {}
    for r in rounds:
        for c in r["clusters"]:
            pair = f"{c['target']}/{c['confused_with']}"
            added[pair] = added.get(pair, 0) + c["added"]
    top = ", ".join(f"{pair} {n}" for pair, n in sorted(added.items(), key=lambda kv: -kv[1])[:5])
    gains = [r["gain_agreement"] for r in rounds if r.get("gain_agreement") is not None]
    agreement = (f"; held-out agreement {pct(rounds[0]['val_agreement'])} → {pct(gains[-1])}"
                 if gains else "")
    stopped = generate["failure_rounds"].get("stopped")
    return (f"{len(rounds)} failure round{'s' if len(rounds) != 1 else ''}: "
            f"{sum(r['added'] for r in rounds)} examples added around {len(added)} confused "
            f"pairs ({top}){agreement}" + (f"; stopped: {stopped}" if stopped else ""))
