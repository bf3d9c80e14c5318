"""Teacher prompts: Jinja2 templates rendered into chat messages.

The built-in templates live in `distill_compiler/teacher/templates/`; a spec's `teacher.templates`
folder overrides any of them by file name (generate keys on those files' bytes). Every prompt
is a pure function of its variables, so the same (intent, register, batch) always renders
the same request and hits the same cache entry.
"""

from __future__ import annotations

from pathlib import Path

REGISTER_STYLES = {
    "formal": "formal and polite, in complete sentences, as in an email to a company",
    "terse": "terse: a few words, no greeting, like a search query or a hurried chat line",
    "slang": "casual, with slang, abbreviations and emoji, as in a messaging app",
    "typos": "typed in a hurry on a phone: realistic typos, missing capitals and punctuation",
    "multilingual": "natural and idiomatic, written by a native speaker",
}
LANGUAGES = {"en": "English", "es": "Spanish", "de": "German", "fr": "French", "pt": "Portuguese",
             "it": "Italian", "nl": "Dutch", "pl": "Polish", "ja": "Japanese", "zh": "Chinese",
             "ko": "Korean", "ar": "Arabic", "hi": "Hindi", "tr": "Turkish", "ru": "Russian"}


class Prompts:
    def __init__(self, override_dir: Path | None = None):
        import jinja2

        loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("distill_compiler.teacher", "templates")]
        if override_dir is not None:
            loaders.insert(0, jinja2.FileSystemLoader(str(override_dir)))
        # StrictUndefined: a typo in an override template fails loudly instead of rendering "".
        self._env = jinja2.Environment(loader=jinja2.ChoiceLoader(loaders),
                                       undefined=jinja2.StrictUndefined, trim_blocks=True,
                                       lstrip_blocks=True, keep_trailing_newline=False,
                                       autoescape=False)

    def text(self, name: str, **variables) -> str:
        return self._env.get_template(f"{name}.j2").render(**variables).strip()

    def chat(self, system: str, user: str, **variables) -> list[dict]:
        """[system, user] messages from two templates sharing the same variables."""
        return [{"role": "system", "content": self.text(system, **variables)},
                {"role": "user", "content": self.text(user, **variables)}]


def register_style(register: str, language: str | None = None) -> str:
    style = REGISTER_STYLES[register]
    if language:
        style += f", in {LANGUAGES.get(language, language)}"
    return style
