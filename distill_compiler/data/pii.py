"""PII scrubbing: emails, card numbers (Luhn-checked), IBANs (mod-97 checked), phone numbers.

Each match becomes a placeholder (`[EMAIL]`, `[CARD]`, `[IBAN]`, `[PHONE]`). The checksums keep
order numbers and amounts from being taken for cards or IBANs. Patterns run in that order,
so a card number is never half-eaten by the phone pattern.
"""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# A phone number: 8-15 digits in international (+44 ...), national (0...) or North American
# (555-123-4567) form. A bare run of digits or a date is more often an order number or a day.
PHONE = re.compile(r"(?<![\w+])(?:\+\d[\d ()./-]{6,}\d|\(?0\d[\d ()./-]{6,}\d"
                   r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?!\w)")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def scrub(text: str) -> tuple[str, Counter]:
    """The text with PII replaced, and how many of each kind were found."""
    found: Counter[str] = Counter()

    def replace(pattern: re.Pattern, kind: str, valid, source: str) -> str:
        def sub(match: re.Match) -> str:
            if not valid(match.group(0)):
                return match.group(0)
            found[kind] += 1
            return f"[{kind}]"
        return pattern.sub(sub, source)

    text = replace(EMAIL, "EMAIL", lambda m: True, text)
    text = replace(IBAN, "IBAN", iban_ok, text)
    text = replace(CARD, "CARD", lambda m: luhn_ok(_digits(m)), text)
    text = replace(PHONE, "PHONE", lambda m: 8 <= len(_digits(m)) <= 15, text)
    return text, found


def scrub_value(value, found: Counter):
    """Scrub every string inside a JSON value (inputs, extract targets, chat messages)."""
    if isinstance(value, str):
        text, n = scrub(value)
        found.update(n)
        return text
    if isinstance(value, list):
        return [scrub_value(v, found) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, found) for k, v in value.items()}
    return value
