"""Where a teacher endpoint's API key comes from: the variable the spec names, litellm's own
defaults, or (for a local server that needs none) a placeholder. The key is handed to litellm
and nothing else; no cache key or file holds it."""

from __future__ import annotations

from ..errors import StageError


def api_key_for(env_name: str | None, api_base: str | None, model: str, env, *,
                field: str = "teacher.api_key_env") -> str | None:
    """The key in the variable `env_name` names (`field` is where the spec names it); None
    lets litellm read its own defaults (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...)."""
    if env_name is not None:
        if not env.get(env_name):
            raise StageError("generate", f"{field} names ${env_name}, which is not set",
                             f"export {env_name}=... before compiling")
        return env[env_name]
    if api_base and not _default_key_present(model):
        # A local OpenAI-compatible server needs no key, but the client refuses to send
        # without one: hand it a placeholder.
        return "no-key"
    return None


def _default_key_present(model: str) -> bool:
    import litellm

    return bool(litellm.validate_environment(model).get("keys_in_environment"))


__all__ = ["api_key_for"]
