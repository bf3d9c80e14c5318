"""Which JSON Schemas constrained decoding can enforce, and why not the others.

Standard library only, so spec checks (`distill check`) can call check_schema without numpy;
constrained.py compiles the schemas that pass into a decoding grammar.
"""

from __future__ import annotations

import json
import math

# --------------------------------------------------------------------------- schema check

# Keywords that only document the schema; they never constrain a value.
ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$schema", "$id",
                         "$comment", "deprecated", "readOnly", "writeOnly"})
# What the decoder enforces, per JSON type.
KEYWORDS_BY_TYPE = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength"}),
    "integer": frozenset(),
    "number": frozenset(),
    "boolean": frozenset(),
    "null": frozenset(),
}
SUPPORTED_KEYWORDS = (ANNOTATIONS | {"type", "enum", "const", "anyOf"}
                      | frozenset().union(*KEYWORDS_BY_TYPE.values()))
_BOUNDS_HINT = ("numeric bounds are not enforced by constrained decoding (remove it, or use "
                "enum for a closed set of values)")
# Why a keyword is refused, and what to do instead; any other keyword gets a generic message.
UNSUPPORTED_HINTS = {
    "format": "'format' cannot be enforced by constrained decoding (remove it and use a plain "
              "string; describe the format in 'description')",
    "pattern": "'pattern' is not supported: this decoder does not run regular expressions "
               "(remove it, or use enum for a closed set of strings)",
    "$ref": "'$ref' is not supported (inline the referenced schema)",
    "$defs": "'$defs' is not supported (inline the definitions where they are used)",
    "definitions": "'definitions' is not supported (inline the definitions where they are used)",
    "oneOf": "'oneOf' is not supported: the decoder cannot guarantee that exactly one branch "
             "matches (use anyOf)",
    "allOf": "'allOf' is not supported (merge its branches into one schema)",
    "not": "'not' cannot be enforced by constrained decoding",
    "minimum": f"'minimum': {_BOUNDS_HINT}",
    "maximum": f"'maximum': {_BOUNDS_HINT}",
    "exclusiveMinimum": f"'exclusiveMinimum': {_BOUNDS_HINT}",
    "exclusiveMaximum": f"'exclusiveMaximum': {_BOUNDS_HINT}",
    "multipleOf": f"'multipleOf': {_BOUNDS_HINT}",
    "prefixItems": "tuple arrays ('prefixItems') are not supported (use an object)",
    "patternProperties": "'patternProperties' is not supported: free-form keys cannot be "
                         "enforced (list the properties)",
}


class SchemaNotEnforceable(ValueError):
    """A schema with keywords or values the decoder cannot enforce; `problems` lists them all."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("the schema cannot be enforced by constrained decoding:\n  "
                         + "\n  ".join(problems))


def check_schema(schema: object) -> list[str]:
    """Every reason the decoder cannot enforce `schema`, as 'json.path: message'; [] when it can.

    The decoder never ignores a keyword: anything outside SUPPORTED_KEYWORDS is a problem, so is
    a keyword that does not apply to the declared type (`maxLength` on an integer) and a value
    the decoder could never complete (a required property that is not declared).
    """
    problems: list[str] = []
    _check(schema, (), problems)
    return problems


def _where(path: tuple[str, ...], *more: str) -> str:
    return ".".join(path + more) or "<root>"


def _check(schema: object, path: tuple[str, ...], problems: list[str]) -> None:
    def problem(message: str, *more: str) -> None:
        problems.append(f"{_where(path, *more)}: {message}")

    if not isinstance(schema, dict):
        problem(f"a schema must be an object with a 'type', not {json.dumps(schema)}")
        return
    if "anyOf" in schema:
        _check_any_of(schema, path, problem, problems)
    elif "enum" in schema or "const" in schema:
        _check_enum(schema, problem)
    elif "type" not in schema:
        # A lone $ref or oneOf is better reported as itself than as a missing type.
        if not _check_keywords(schema, SUPPORTED_KEYWORDS, problem):
            problem("no 'type': the decoder needs a type (or enum, const or anyOf) to know what "
                    "to emit")
    else:
        _check_typed(schema, path, problem, problems)


def _type_list(schema: dict, problem) -> list[str] | None:
    types = schema["type"]
    types = [types] if isinstance(types, str) else types
    if (not isinstance(types, list) or not types or len(set(map(str, types))) != len(types)
            or any(t not in KEYWORDS_BY_TYPE for t in types)):
        problem(f"'type' must be one of {sorted(KEYWORDS_BY_TYPE)} or a list of distinct ones, "
                f"not {json.dumps(schema['type'])}", "type")
        return None
    return types


def _check_keywords(schema: dict, applicable: frozenset, problem) -> bool:
    """Report each keyword outside `applicable`; whether there was one."""
    found = False
    for key in schema:
        if key in applicable:
            continue
        found = True
        if key in SUPPORTED_KEYWORDS:
            problem(f"'{key}' does not apply to type {json.dumps(schema.get('type'))}", key)
        else:
            problem(UNSUPPORTED_HINTS.get(
                key, f"'{key}' cannot be enforced by constrained decoding (remove it)"), key)
    return found


def _check_any_of(schema: dict, path, problem, problems) -> None:
    others = sorted(set(schema) - ANNOTATIONS - {"anyOf"})
    if others:
        problem(f"'anyOf' must stand alone next to annotations; move {others} into each branch",
                "anyOf")
    branches = schema["anyOf"]
    if not isinstance(branches, list) or not branches:
        problem("'anyOf' must be a non-empty list of schemas", "anyOf")
        return
    for i, branch in enumerate(branches):
        _check(branch, path + ("anyOf", str(i)), problems)


def _check_enum(schema: dict, problem) -> None:
    if "enum" in schema and "const" in schema:
        problem("give either 'enum' or 'const', not both", "const")
    key = "enum" if "enum" in schema else "const"
    values = schema["enum"] if key == "enum" else [schema["const"]]
    if not isinstance(values, list) or not values:
        problem("'enum' must be a non-empty list", key)
        return
    for other in sorted(set(schema) - ANNOTATIONS - {"enum", "const", "type"}):
        problem(f"'{other}' next to '{key}': the {key} already fixes the value (drop '{other}', "
                f"or filter the {key} values)", other)
    types = _type_list(schema, problem) if "type" in schema else None
    for value in values:
        if not _finite(value):
            problem(f"{value!r} is not a JSON value", key)
        elif types and not any(_is_type(value, t) for t in types):
            problem(f"{json.dumps(value)} is not of type {json.dumps(schema['type'])}", key)


def _check_typed(schema: dict, path, problem, problems) -> None:
    types = _type_list(schema, problem)
    if types is None:
        return
    applicable = ANNOTATIONS | {"type"} | frozenset().union(*(KEYWORDS_BY_TYPE[t] for t in types))
    _check_keywords(schema, applicable, problem)
    if "object" in types:
        _check_object(schema, path, problem, problems)
    if "array" in types:
        if not isinstance(schema.get("items"), dict):
            problem("an array needs 'items' with a schema (tuple arrays are not supported)",
                    "items")
        else:
            _check(schema["items"], path + ("items",), problems)
        _check_bounds(schema, "minItems", "maxItems", problem)
    if "string" in types:
        _check_bounds(schema, "minLength", "maxLength", problem)


def _check_object(schema: dict, path, problem, problems) -> None:
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        problem("'properties' must map names to schemas", "properties")
        props = {}
    for name, sub in props.items():
        _check(sub, path + ("properties", name), problems)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        problem("'required' must be a list of property names", "required")
    else:
        for name in required:
            if name not in props:
                problem(f"required property '{name}' is not in 'properties' (the decoder emits "
                        "declared properties only, so it could never appear)", "required")
    extra = schema.get("additionalProperties", False)
    if not isinstance(extra, bool):
        problem("a schema-valued 'additionalProperties' (free-form keys) cannot be enforced; "
                "list the properties and set additionalProperties: false",
                "additionalProperties")


def _check_bounds(schema: dict, low: str, high: str, problem) -> None:
    for key in (low, high):
        value = schema.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problem(f"'{key}' must be a non-negative integer", key)
            return
    if high in schema and schema.get(low, 0) > schema[high]:
        problem(f"'{low}' {schema[low]} is greater than '{high}' {schema[high]}", low)


def _is_type(value: object, t: str) -> bool:
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    kinds = {"string": str, "boolean": bool, "null": type(None), "object": dict, "array": list}
    return isinstance(value, kinds[t])


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True
