"""Reading a spec file: YAML with positions, pydantic validation, the cross-field checks, and every
problem reported at once as `file:line:col` (SpecError), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import Problem, SpecError
from .checks import check_spec
from .models import NAME_PATTERN, Spec, model_of
from .positions import Located, escaped
from .positions import load as load_located

# --------------------------------------------------------------------------- loading

def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> Spec:
    """Read, validate and cross-check a spec file; raise SpecError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(str(path), [Problem("", f"cannot read spec: {exc.strerror}",
                                            "check the path")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [_not_utf8(raw, exc)]) from None
    return parse_spec(text, str(path), overrides)


def _not_utf8(raw: bytes, exc: UnicodeDecodeError) -> Problem:
    """Where a spec file stops being UTF-8; the snippet shows the bad byte escaped."""
    start = raw.rfind(b"\n", 0, exc.start) + 1
    end = raw.find(b"\n", exc.start)
    row = escaped(raw[start:end if end >= 0 else len(raw)].decode("utf-8",
                                                                             "backslashreplace"))
    line = raw.count(b"\n", 0, exc.start) + 1
    col = len(escaped(raw[start:exc.start].decode("utf-8", "backslashreplace"))) + 1
    snippet = Located(None, [""] * (line - 1) + [row]).snippet(line, col)
    return Problem("", f"the file is not UTF-8: byte 0x{raw[exc.start]:02x} cannot be read here",
                   "save the file as UTF-8", line, col, snippet)


def parse_spec(text: str, file: str = "spec.yaml", overrides: dict[str, Any] | None = None) -> Spec:
    located = load_located(text, file)
    data = located.data
    if not isinstance(data, dict):
        raise SpecError(file, [located.problem((), "the spec must be a mapping of sections",
                                               "start with `name:` and `task:`")])
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(data, dotted_key, value)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems = [_pydantic_problem(e, located) for e in exc.errors()]
        raise SpecError(file, sorted(problems, key=_reading_order)) from None
    problems = [located.problem(path, msg, hint) for path, msg, hint in check_spec(spec)]
    if problems:
        raise SpecError(file, sorted(problems, key=_reading_order))
    return spec


def _reading_order(problem: Problem) -> tuple[int, int]:
    return (problem.line or 0, problem.col or 0)


def _set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    node = data
    *parents, last = dotted_key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError("--set", [Problem(dotted_key, f"'{part}' is not a section",
                                              "--set only reaches mapping fields")])
    node[last] = value


def _pydantic_problem(err: dict, located: Located) -> Problem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = tuple("schema" if p == "schema_" else p for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return located.problem(path, "unknown field", _did_you_mean(path), key=True)
    if kind == "missing":
        return located.problem(path, "required field is missing", f"add `{path[-1]}:`", key=True)
    msg = err["msg"]
    if kind in ("string_type", "literal_error") and located.not_a_string(path):
        message, hint = located.not_a_string(path)
        return located.problem(path, message, hint)
    if kind == "literal_error":
        hint = None
    elif kind == "string_pattern_mismatch":
        hint = "use lower_snake_case" if err["ctx"]["pattern"] == NAME_PATTERN else None
        msg = f"{err['input']!r} does not match {err['ctx']['pattern']}"
    else:
        hint = None
    msg = msg.replace("valid tuple", "list").replace("valid dictionary", "mapping")
    return located.problem(path, msg[0].lower() + msg[1:], hint)


def _did_you_mean(path: tuple) -> str:
    """Suggest the closest field name of the model that owns `path`."""
    model: Any = Spec
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get("schema_" if part == "schema" else part)
        if field is None:
            return "remove it"
        model = model_of(field.annotation)
        if model is None:
            return "remove it"
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(path[-1]), names, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid fields: " + ", ".join(names)
