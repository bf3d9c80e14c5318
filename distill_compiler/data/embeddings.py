"""Sentence vectors for the data stages: which pool requests to pay for, which intents are close.

`data.embedder` names the encoder (`minilm-l6`, which ships offline, or a local folder saved
with save_pretrained). It is read the way the classifier student reads its base: masked mean of
the token states, L2-normalised, so a cosine is a dot product. It is a separate setting from
`student.base` so that changing the student never reruns the data stages; with the default
base the two are the same encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BATCH = 64
MAX_LENGTH = 128  # requests longer than this are judged by their first 128 tokens


class SentenceEncoder:
    def __init__(self, embedder: str, spec_dir: Path, stage: str = "generate"):
        import torch

        from ..errors import StageError
        from ..students.classifier.model import load_encoder, masked_mean
        from ..students.quiet import quiet_training_libraries

        quiet_training_libraries()
        try:
            encoder, self.tokenizer = load_encoder(embedder, spec_dir)
        except StageError as exc:
            raise StageError(stage, f"data.embedder: {exc.message}", exc.hint) from None
        self.encoder = encoder.eval()
        self.torch, self.pool = torch, masked_mean

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit rows, in the order given."""
        out = []
        with self.torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                enc = self.tokenizer(texts[start:start + BATCH], padding=True, truncation=True,
                                     max_length=MAX_LENGTH, return_tensors="pt")
                hidden = self.encoder(**enc).last_hidden_state
                pooled = self.torch.nn.functional.normalize(
                    self.pool(hidden, enc["attention_mask"]), dim=-1)
                out.append(pooled.float().numpy())
        width = self.encoder.config.hidden_size
        return np.concatenate(out) if out else np.zeros((0, width), np.float32)
