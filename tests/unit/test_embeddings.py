"""The data stages' sentence encoder: unit rows, order kept, clear error on a bad folder."""

from __future__ import annotations

import numpy as np
import pytest

from distill_compiler.data.embeddings import SentenceEncoder
from distill_compiler.errors import StageError


def test_rows_are_unit_vectors_in_input_order(tiny_encoder_dir, tmp_path):
    encoder = SentenceEncoder(str(tiny_encoder_dir), tmp_path)
    texts = [f"I was charged twice for my order {i}" for i in range(70)]  # > one batch
    vectors = encoder.encode(texts)
    assert vectors.shape == (70, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Batching does not change a row: the 65th text alone gives the same vector.
    np.testing.assert_allclose(encoder.encode([texts[64]])[0], vectors[64], atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)


def test_a_missing_folder_names_the_setting(tmp_path):
    encoder = SentenceEncoder("./no-such-encoder", tmp_path)
    with pytest.raises(StageError) as err:
        encoder.encode(["hello"])
    assert "data.embedder" in err.value.message


def test_vectors_are_read_back_from_the_cache(tiny_encoder_dir, tmp_path):
    texts = ["refund my order", "where is my parcel"]
    first = SentenceEncoder(str(tiny_encoder_dir), tmp_path).encode_cached(texts, tmp_path / "c")
    cached = SentenceEncoder(str(tiny_encoder_dir), tmp_path)
    again = cached.encode_cached(texts, tmp_path / "c")
    assert cached._loaded is None  # answered from the cache without loading the encoder
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "c" / "embeddings").glob("*.npy"))) == 1
