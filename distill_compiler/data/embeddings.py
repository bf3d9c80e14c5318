"""Sentence vectors for the data stages: which pool requests to pay for, which intents are close.

`data.embedder` names the encoder (`minilm-l6`, which ships offline, or a local folder saved
with save_pretrained). It is read the way the classifier student reads its base: masked mean of
the token states, L2-normalised, so a cosine is a dot product. It is a separate setting from
`student.base` so that changing the student never reruns the data stages; with the default
base the two are the same encoder.

Vectors of a list of texts are kept under the build cache (`<cache>/embeddings/`), keyed by the
encoder's files and the texts: a rerun, a larger label budget or `distill plan` reads a 10,000
request pool back in milliseconds instead of encoding it again for a minute.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

BATCH = 64
MAX_LENGTH = 128  # requests longer than this are judged by their first 128 tokens
CACHE_DIR = "embeddings"


class SentenceEncoder:
    def __init__(self, embedder: str, spec_dir: Path, stage: str = "generate"):
        self.embedder, self.spec_dir, self.stage = embedder, spec_dir, stage
        self._loaded = None  # (encoder, tokenizer), on first use

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit rows, in the order given."""
        import torch

        from ..students.classifier.model import masked_mean

        encoder, tokenizer = self._load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                enc = tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                max_length=MAX_LENGTH, return_tensors="pt")
                hidden = encoder(**enc).last_hidden_state
                pooled = torch.nn.functional.normalize(masked_mean(hidden, enc["attention_mask"]),
                                                       dim=-1)
                out.append(pooled.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, encoder.config.hidden_size), np.float32)

    def encode_cached(self, texts: list[str], cache_root: Path) -> np.ndarray:
        """`encode(texts)`, read from the build cache when these texts were encoded before."""
        if not texts:
            return self.encode(texts)
        digest = hashlib.sha256(self._identity().encode())
        for text in texts:
            digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
        path = cache_root / CACHE_DIR / f"{digest.hexdigest()[:32]}.npy"
        if path.is_file():
            return np.load(path)
        vectors = self.encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        with open(partial, "wb") as f:  # np.save on a path would append .npy to the name
            np.save(f, vectors)
        os.replace(partial, path)  # atomic: an interrupted write leaves no half file behind
        return vectors

    def _identity(self) -> str:
        """The encoder as its files are now: a folder replaced in place gets new vectors."""
        from ..students.classifier.model import resolve_base

        source = Path(self._resolve(resolve_base))
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else []
        stats = [f"{p.relative_to(source)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return "\n".join([str(source), f"max_length={MAX_LENGTH}", *stats])

    def _resolve(self, resolve_base) -> str:
        from ..errors import StageError

        try:
            return resolve_base(self.embedder, self.spec_dir)
        except StageError as exc:
            raise StageError(self.stage, f"data.embedder: {exc.message}", exc.hint) from None

    def _load(self):
        if self._loaded is None:
            from ..errors import StageError
            from ..students.classifier.model import load_encoder
            from ..students.quiet import quiet_training_libraries

            quiet_training_libraries()
            try:
                encoder, tokenizer = load_encoder(self.embedder, self.spec_dir)
            except StageError as exc:
                raise StageError(self.stage, f"data.embedder: {exc.message}", exc.hint) from None
            self._loaded = (encoder.eval(), tokenizer)
        return self._loaded
