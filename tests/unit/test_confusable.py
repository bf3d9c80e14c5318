"""Which intent pairs are close: ranking on hand-made vectors, and what each intent is read from."""

from __future__ import annotations

import numpy as np

from distill_compiler.data.confusable import (
    LOGGED,
    found_pairs,
    intent_texts,
    intent_vectors,
    named_pairs,
    nearest_pairs,
)
from distill_compiler.spec.load import parse_spec


def unit(*rows) -> np.ndarray:
    v = np.array(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# refund and billing nearly coincide, delivery is near neither, and wrong_item sits between.
# Cosines: billing~refund 0.96, billing~wrong_item 0.71, delivery~wrong_item 0.69,
# refund~wrong_item 0.68, the two with delivery under 0.1: no two within float noise.
NAMES = ["refund", "billing", "delivery", "wrong_item"]
VECTORS = unit([1, 0.3, 0], [1, 0, 0], [0, 0.2, 1], [1, 0, 1])


def test_the_nearest_pair_comes_first_with_its_names_in_order():
    pairs = nearest_pairs(NAMES, VECTORS, 2)
    assert [(a, b) for a, b, _ in pairs] == [("billing", "refund"), ("billing", "wrong_item")]
    assert pairs[0][2] > 0.9 and pairs[1][2] < 0.8


def test_named_pairs_are_skipped_not_counted():
    pairs = nearest_pairs(NAMES, VECTORS, 2, exclude=[("refund", "billing")])
    assert [(a, b) for a, b, _ in pairs] == [("billing", "wrong_item"), ("delivery", "wrong_item")]


def test_more_pairs_than_there_are_gives_them_all_once():
    pairs = nearest_pairs(NAMES, VECTORS, 100)
    assert len(pairs) == 6 == len({(a, b) for a, b, _ in pairs})
    assert all(a < b for a, b, _ in pairs)


def test_ties_fall_to_the_names_whatever_the_spec_order():
    same = unit([1, 0], [1, 0], [1, 0])
    for names in (["c", "a", "b"], ["b", "c", "a"]):
        assert [(a, b) for a, b, _ in nearest_pairs(names, same, 3)] == [
            ("a", "b"), ("a", "c"), ("b", "c")]


def test_an_intent_vector_is_the_normalised_mean_of_its_texts():
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0]}
    vectors = intent_vectors(lambda texts: unit(*[table[t] for t in texts]), [["a", "b"], ["c"]])
    np.testing.assert_allclose(vectors, unit([1, 1], [1, 0]), atol=1e-6)


SPEC = """
name: shop
task: classify
intents:
  - name: wrong_item
    description: The parcel held something else.
    examples: ["this is not what I ordered"]
  - name: refund
    description: Money back.
    confusable_with: [wrong_item]
teacher: {model: openai/x}
"""


def test_each_intent_reads_its_description_examples_and_first_logged_requests():
    spec = parse_spec(SPEC)
    logged = [{"input": {"message": f"refund {i}"}, "target": "refund"} for i in range(LOGGED + 5)]
    logged += [{"input": {"message": "hello"}, "target": "out_of_scope"},
               {"input": {"message": "  "}, "target": "wrong_item"}]
    wrong_item, refund = intent_texts(spec.intents, logged, "message")
    assert wrong_item == ["wrong item: The parcel held something else.", "this is not what I ordered"]
    assert refund == ["refund: Money back.", *(f"refund {i}" for i in range(LOGGED))]
    assert named_pairs(spec.intents) == [("refund", "wrong_item")]


def test_found_pairs_read_the_encoder_and_skip_the_named_pair(tiny_encoder_dir, tmp_path):
    three = SPEC.replace("teacher:", """  - name: delivery
    description: Where a parcel is.
teacher:""") + f"data: {{hard_negatives: 4, confusable_pairs: 5, embedder: '{tiny_encoder_dir}'}}\n"
    logged = [{"input": {"message": "where is my parcel"}, "target": "delivery"}]
    pairs = found_pairs(parse_spec(three), tmp_path, logged)
    # Five asked for, two left once refund~wrong_item (named) is skipped; their order is the
    # untrained encoder's, so only the set is checked.
    assert sorted((a, b) for a, b, _ in pairs) == [("delivery", "refund"), ("delivery", "wrong_item")]
    assert found_pairs(parse_spec(three.replace("confusable_pairs: 5", "confusable_pairs: 0")),
                       tmp_path, logged) == []
