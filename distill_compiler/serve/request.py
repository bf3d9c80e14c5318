"""Reading an OpenAI chat completions request: the errors the server answers with, the text of
messages, and the bundle input a classify or extract request carries in its last user message.

A last user message whose content is a JSON object is taken as the whole input; any other text
goes into the input schema's single string property.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the server refuses; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, code: str, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


def messages_of(body: Any) -> list[dict]:
    """The request's `messages`, checked to be a non-empty list of role-tagged objects."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty array of chat messages",
                       "missing_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object whose role is one of "
                           f"{', '.join(ROLES)}", "invalid_message")
    return messages


def last_user_text(messages: list[dict], what: str) -> str:
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if user is None:
        raise ApiError(400, f"`messages` has no user message to {what}", "missing_messages")
    return content_text(user.get("content"))


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise ApiError(400, "a message's content must be a string or a list of text parts",
                   "invalid_content")


def bundle_input(messages: list[dict], text_field: str | None, what: str) -> dict:
    """The bundle input the last user message carries."""
    text = last_user_text(messages, what)
    value = _json_object(text)
    if value is not None:
        return value
    if text_field is None:
        raise ApiError(422, "this bundle's input has several fields: send the last user "
                       "message's content as a JSON object matching the input schema",
                       "input_schema")
    return {text_field: text}


def _json_object(text: str) -> dict | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not an object after all: the text is the input
        return None
    return value if isinstance(value, dict) else None


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) as the request asks."""
    options = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(isinstance(options, dict) and options.get("include_usage"))
