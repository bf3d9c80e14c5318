"""Property test: no mutant of a shipped spec makes `load_spec` raise anything but SpecError.

Each mutant is one of the shipped specs (specs/*.yaml, examples/*/spec.yaml) after a few edits
of the kinds a hand-edited file suffers: lines deleted, duplicated, swapped or re-indented,
values replaced with junk (YAML 1.1 booleans, tags, anchors, brackets, control characters,
a lone surrogate, bytes that are not UTF-8). Seeded (derandomized), so every run tries the same
mutants; a failure shrinks to a small reproducer. `python -m pytest tests/unit/test_spec_fuzz.py
-s` prints the counts quoted in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from distill_compiler.errors import SpecError
from distill_compiler.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted(ROOT.glob("specs/*.yaml")) + sorted(ROOT.glob("examples/*/spec.yaml"))
MUTANTS = 1200

JUNK = [
    "\x00", "\x07", "\x1b", "\x7f", "\ufffe", "\ud800", "\u2028", "\x85", "\t", "\r",
    "yes", "no", "on", "off", "~", "null", "true", "1e3", "0x1F", "0o17", "2024-01-01",
    "12:30:00", ".inf", ".nan", "-", "404", "1_000",
    "!!python/object:os.system", "!!python/name:os.system", "!foo", "!!binary", "!!float x",
    "!!int x", "!!timestamp x", "!!set", "!!omap", "!!map", "!!seq", "!!str", "!!null",
    "!!bool", "!!merge", "&a [*a]", "*nope", "&x {a: 1}", "<<: *x", "? [a, b]",
    "{", "[", "]", "}", ":", "- ", "? ", "'", '"', "|", ">", "%YAML 1.1", "---", "...", "#",
    "@", "`", "[1, [2, [3]]]", "{a: {b: c}}", "[" * 300, "x" * 3000, "\U0001F642", "é",
]
BAD_BYTES = [b"\xff", b"\xc3", b"\xe9", b"\xed\xa0\x80", b"\x80\x80"]

line_edit = st.tuples(st.sampled_from(["delete", "duplicate", "indent", "insert", "value",
                                       "swap"]),
                      st.integers(0, 10_000), st.integers(0, 10_000), st.integers(0, 8),
                      st.one_of(st.sampled_from(JUNK), st.text(max_size=4)))
byte_edit = st.tuples(st.integers(0, 100_000), st.sampled_from(BAD_BYTES))


def mutate(text: str, edits: list[tuple]) -> str:
    lines = text.split("\n")
    for kind, i, j, indent, junk in edits:
        i, j = i % len(lines), j % len(lines)
        line = lines[i]
        if kind == "delete" and len(lines) > 1:
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, line)
        elif kind == "indent":
            lines[i] = " " * indent + line.lstrip()
        elif kind == "insert":
            at = j % (len(line) + 1)
            lines[i] = line[:at] + junk + line[at:]
        elif kind == "value" and ":" in line:
            lines[i] = line.split(":", 1)[0] + ": " + junk
        elif kind == "swap":
            lines[i], lines[j] = lines[j], line
    return "\n".join(lines)


def to_bytes(text: str, byte_edits: list[tuple]) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate stays: invalid UTF-8
    for at, bad in byte_edits:
        at %= len(raw) + 1
        raw = raw[:at] + bad + raw[at:]
    return raw


def test_no_mutant_of_a_shipped_spec_raises_anything_but_a_spec_error(tmp_path):
    assert len(SPECS) >= 5, SPECS
    texts = [p.read_text(encoding="utf-8") for p in SPECS]
    counts: Counter[str] = Counter()
    target = tmp_path / "spec.yaml"

    @settings(max_examples=MUTANTS, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate, Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(texts) - 1), st.lists(line_edit, min_size=1, max_size=4),
           st.lists(byte_edit, max_size=1))
    def try_mutant(which: int, edits: list[tuple], byte_edits: list[tuple]) -> None:
        target.write_bytes(to_bytes(mutate(texts[which], edits), byte_edits))
        counts["mutants"] += 1
        try:
            load_spec(target)
        except SpecError as exc:
            counts["spec_errors"] += 1
            rendered = exc.render()
            # What `distill check` prints reaches a terminal: no raw control characters.
            assert not [c for c in rendered if c not in "\n\t"
                        and unicodedata.category(c) in ("Cc", "Cs")], repr(rendered)
        else:
            counts["loaded"] += 1

    try_mutant()
    print(f"\nspec fuzz: {counts['mutants']} mutants, {counts['spec_errors']} spec errors, "
          f"{counts['loaded']} loaded, 0 tracebacks")
    assert counts["mutants"] >= 1000
    assert counts["spec_errors"] >= counts["mutants"] // 4  # the mutations do break specs
