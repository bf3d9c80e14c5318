"""The task spec: the front end of the compiler.

    models     the strict, frozen pydantic *Spec classes, one section per pipeline stage
    load       load_spec/parse_spec: YAML with positions, every problem at once as file:line:col
    positions  YAML loading that remembers where every value came from
    checks     the rules that span fields (names, references, enforceable schemas, ...)
    docs       field documentation and the JSON Schema of the format
"""

from __future__ import annotations

from .checks import check_spec
from .docs import field_docs, json_schema
from .load import load_spec, parse_spec
from .models import NOT_KEYED, OUT_OF_SCOPE, Spec, class_labels, wants_generation

__all__ = ["NOT_KEYED", "OUT_OF_SCOPE", "Spec", "check_spec", "class_labels", "field_docs",
           "json_schema", "load_spec", "parse_spec", "wants_generation"]
