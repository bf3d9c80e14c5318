"""What a request may hold, checked before any tokenizer or model sees it.

`distill run`, the Python API (`Bundle.predict`) and `distill serve` all reach a bundle through
its policy's `check_input`, which calls these, so the three front ends refuse the same
requests with the same `invalid input at $.path: ...` message:

    parse_json     request text or bytes -> value; not UTF-8, not JSON, nested too deeply
    check_values   every string valid Unicode without NUL, keys strings, bounded nesting
    schema_error   the input schema's best error, quoting at most QUOTE_CHARS of the input
    check_text     the text a student reads is not empty or only whitespace

Standard library only: jsonschema is imported by the policies that validate, not here.
"""

from __future__ import annotations

import json
from typing import Any

from .format import InputError

# Nesting a real request needs is a few levels (agent: messages, a call, its arguments); the
# bound keeps jsonschema, which recurses per level, far from Python's recursion limit.
MAX_DEPTH = 32
# What an error message quotes of the input; a refused 3,000-character message is not echoed.
QUOTE_CHARS = 80
MAX_MESSAGE_CHARS = 300
JSON_TYPES = (str, int, float, bool, type(None))


def cut(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def parse_json(data: str | bytes, where: str = "$") -> Any:
    """One request's JSON text as a value; InputError (at `where`) when it cannot be read."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8",
                             where) from None
    try:
        return json.loads(data)
    except RecursionError:
        raise InputError(f"JSON nested more than {MAX_DEPTH} levels deep", where) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         where) from None


def check_values(value: Any, where: str = "$") -> None:
    """Walk `value` without recursion: JSON types only, string keys, valid text, bounded depth."""
    stack = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"nested more than {MAX_DEPTH} levels deep", path)
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InputError(f"object keys must be strings, not {type(key).__name__}", path)
                check_string(key, f"{path} (a key)")
                stack.append((child, f"{path}.{key}" if key.isidentifier() else
                              f"{path}[{json.dumps(cut(key, 40))}]", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            check_string(item, path)
        elif not isinstance(item, JSON_TYPES):
            raise InputError(f"{type(item).__name__} is not a JSON value", path)


def check_string(text: str, path: str) -> None:
    """Refuse what tokenizers cannot encode (lone surrogates, including bytes that were not
    UTF-8 and came in through surrogateescape) and NUL, which no text means."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        if "\udc80" <= char <= "\udcff":  # how Python decodes argv or a file's invalid bytes
            problem = f"byte 0x{ord(char) - 0xdc00:02x} is not UTF-8"
        else:
            problem = f"a lone surrogate U+{ord(char):04X} is not valid Unicode"
        raise InputError(f"{problem} (character {exc.start}); send UTF-8 text", path) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise InputError(f"NUL (U+0000) at character {nul}; text may not contain NUL", path)


def check_text(text: Any, path: str) -> None:
    """The text a student reads must say something."""
    if isinstance(text, str) and not text.strip():
        raise InputError("the text is empty or only whitespace; there is nothing to answer", path)


def schema_error(validator, value: Any) -> InputError | None:
    """The input schema's most relevant error for `value`, quoting at most QUOTE_CHARS of it."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    message = error.message
    shown = repr(error.instance)
    if len(shown) > QUOTE_CHARS and shown in message:
        message = message.replace(shown, cut(shown))
    return InputError(cut(message, MAX_MESSAGE_CHARS), error.json_path)
