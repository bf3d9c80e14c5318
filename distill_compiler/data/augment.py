"""Deterministic noise: the typos, casing, punctuation and elisions of real typing.

Costs no teacher call. `noisy(text, rng)` applies one to three corruptions chosen by `rng`,
so a copy is reproducible from (data.seed, example id, copy index) and never equals its source.
"""

from __future__ import annotations

import random
import re

# Neighbouring keys on a QWERTY keyboard, for substitution typos.
NEIGHBOURS = dict(zip(
    "qwertyuiopasdfghjklzxcvbnm",
    ["wa", "qes", "wrd", "etf", "ryg", "tuh", "yij", "uok", "ipl", "ol", "qsz", "awdx", "sefc",
     "drgv", "fthb", "gyjn", "hukm", "jil", "kop", "xas", "zcsd", "xvdf", "cbfg", "vnhg", "bmhj",
     "nkj"]))
ELISIONS = [(r"\bI am\b", "im"), (r"\bdo not\b", "dont"), (r"\bcan ?not\b", "cant"),
            (r"\bI have\b", "ive"), (r"\bplease\b", "pls"), (r"\byou\b", "u"),
            (r"\bare\b", "r"), (r"\bthe ", ""), (r"\ba ", ""), (r"\bmy ", "")]


def typo(text: str, rng: random.Random) -> str:
    spots = [i for i, c in enumerate(text) if c.isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    kind = rng.randrange(4)
    if kind == 0 and i + 1 < len(text):
        return text[:i] + text[i + 1] + text[i] + text[i + 2:]  # swap with the next character
    if kind == 1:
        return text[:i] + text[i + 1:]  # drop a letter
    if kind == 2:
        return text[:i] + text[i] + text[i:]  # double a letter
    near = NEIGHBOURS.get(text[i].lower())
    return text[:i] + rng.choice(near) + text[i + 1:] if near else text


def casing(text: str, rng: random.Random) -> str:
    return [str.lower, str.upper, lambda t: t[:1].lower() + t[1:]][rng.randrange(3)](text)


def punctuation(text: str, rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return re.sub(r"[.,!?;:'\"]", "", text)
    if kind == 1:
        return text.rstrip(".!? ") + rng.choice(["??", "!!", "...", " ?"])
    return text.replace(", ", " ").replace(". ", " ")


def elision(text: str, rng: random.Random) -> str:
    applicable = [(p, r) for p, r in ELISIONS if re.search(p, text, re.IGNORECASE)]
    if not applicable:
        return text
    pattern, repl = rng.choice(applicable)
    return re.sub(pattern, repl, text, count=1, flags=re.IGNORECASE)


CORRUPTIONS = (typo, typo, casing, punctuation, elision)


def noisy(text: str, rng: random.Random) -> str:
    out = text
    for _ in range(rng.randint(1, 3)):
        out = rng.choice(CORRUPTIONS)(out, rng)
    for _ in range(8):  # a corruption can be a no-op on some texts: typos always apply
        if out != text or not any(c.isalpha() for c in text):
            break
        out = typo(out, rng)
    return out


def copy_rng(seed: int, example_id: str, copy: int) -> random.Random:
    return random.Random(f"{seed}:{example_id}:{copy}")
