"""The spec format described: `distill show --docs` field rows and the JSON Schema in `specs/`.
Both come from the models' attribute docstrings, so they cannot drift from the code."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from .models import SchemaSpec, Spec, model_of

# --------------------------------------------------------------------------- docs and schema

def json_schema() -> dict:
    """The spec format as JSON Schema, for `specs/task-spec.schema.json` and editors."""
    schema = Spec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://distill-compiler.dev/task-spec.schema.json"
    schema["title"] = "distill-compiler task spec"
    return schema


def field_docs(model: type[BaseModel] = Spec, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, type, doc) for every field, depth first, for `distill show --docs`."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        rows.append((key, _type_name(field.annotation), field.description or ""))
        sub = model_of(field.annotation)
        if sub is not None and sub is not SchemaSpec:
            rows += field_docs(sub, key + ("[]." if "tuple" in str(field.annotation) else "."))
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("distill_compiler.spec.models.", "")
    return re.sub(r"<class '([\w.]+)'>", r"\1", text)
