"""Batched decoding (runtime/decoder.py Batch): requests decoded together get the answers they
get one at a time, whatever their prompt lengths and however rows join and leave, on the tiny
exported decoder (KV cache) of the fixtures, in fp32.

fp32 because a dynamic int8 graph takes one activation scale per run, so its logits move with
the batch (confidence by 3.5 % on this fixture): batching is exact up to float rounding only
where the graph is."""

from __future__ import annotations

import pytest
from tiny_causal import fp32_export, write_causal_bundle

from distill_compiler.runtime import load_bundle

QUESTIONS = ["where is order A15", "hi", "I want to return order B7 because it came broken",
             "track A3", "what can you do for me today, and how fast", "order C12 status?",
             "cancel", "my parcel A99 never arrived and nobody answers the phone"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, exported_causal):
    teacher = {"model": "openai/unused", "api_key_env": "UNUSED_KEY"}
    fp32 = fp32_export(tmp_path_factory.mktemp("fp32") / "export", exported_causal)
    return {task: load_bundle(write_causal_bundle(tmp_path_factory.mktemp(task), fp32, task,
                                                  teacher), threads=1)
            for task in ("agent", "extract")}


def inputs(task: str) -> list[dict]:
    if task == "extract":
        return [{"message": q} for q in QUESTIONS]
    return [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]


@pytest.mark.parametrize("task", ["agent", "extract"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_batched_answers_equal_one_at_a_time(bundles, task, rows):
    bundle = bundles[task]
    decoder, policy = bundle.decoder, bundle.policy
    prompts = [bundle.prompt_ids(x) for x in inputs(task)]
    modes = [policy.mode(x) for x in inputs(task)]
    alone = [decoder.generate(p, m, policy.max_new_tokens) for p, m in zip(prompts, modes)]
    together = decoder.generate_many(prompts, modes, policy.max_new_tokens, rows=rows)
    assert len({len(p) for p in prompts}) > 3  # rows of different lengths share the batch
    for a, b in zip(alone, together):
        assert b.token_ids == a.token_ids and b.message == a.message
        assert b.truncated == a.truncated and b.cached_prefix == a.cached_prefix > 0
        assert b.confidence == pytest.approx(a.confidence, rel=1e-4)


def test_predict_batch_decodes_together_with_the_same_routes(bundles):
    bundle = bundles["agent"]
    items = inputs("agent") + [{"messages": [{"role": "user", "content": "my lawyer wants A15"}]}]
    one_by_one = [bundle.predict(x) for x in items]
    together = bundle.predict_batch(items)
    for a, b in zip(one_by_one, together):
        assert (b["output"], b["route"], b["tokens"]) == (a["output"], a["route"], a["tokens"])
    assert together[-1]["route"] == "teacher"
