import json

import onnxruntime as ort
import pytest
from tiny_causal import agent_record, causal_spec, extract_record

from distill_compiler.data.records import read_jsonl
from distill_compiler.errors import StageError
from distill_compiler.runtime.chat_format import ChatFormat
from distill_compiler.runtime.decoder import Decoder, DecoderSpec
from distill_compiler.stages import export
from distill_compiler.students.causal.export import (
    Parity,
    check_parity,
    fit_context,
    measure_parity,
    parity_prompts,
    torch_greedy,
)
from distill_compiler.students.quantize import quantize


@pytest.fixture(scope="module")
def torch_model(trained_causal):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(trained_causal / "model").eval()


@pytest.fixture(scope="module")
def prompt_ids(exported_causal, causal_splits):
    """Token ids of the export's parity prompts, as the runtime encodes them."""
    prompts = parity_prompts(list(read_jsonl(causal_splits / "val.jsonl")),
                             causal_spec("agent"), ChatFormat())
    decoder = Decoder(exported_causal)
    return [decoder.encode(p) for p in prompts]


def test_artifact_files_and_parity_report(exported_causal):
    names = {p.name for p in exported_causal.iterdir()}
    assert {"model.onnx", "model.fp32.onnx", "tokenizer.json", "chat.json", "decoder.json",
            "parity.json"} <= names
    assert not any(name.endswith(".data") for name in names)  # small enough for one file each
    parity = json.loads((exported_causal / "parity.json").read_text())
    assert parity["quantize"] == "int8" and parity["n"] == 24  # 12 traces x 2 assistant turns
    # A 100-step fixture model has near-tied logits, where int8 rounding flips some argmaxes.
    assert parity["fp32_exact"] == 1.0 and 0.2 <= parity["shipped_agreement"] <= 1.0
    assert parity["max_new_tokens"] == 48
    assert parity["sizes"]["model.onnx"] < parity["sizes"]["model.fp32.onnx"]
    assert ChatFormat.from_dict(json.loads((exported_causal / "chat.json").read_text())) == ChatFormat()


def test_graph_has_a_kv_cache_and_decoder_json_describes_it(exported_causal):
    spec = DecoderSpec.load(exported_causal / "decoder.json")
    session = ort.InferenceSession(str(exported_causal / "model.fp32.onnx"))
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert spec.past_inputs == inputs[3:] and len(spec.past_inputs) == 4  # 2 layers x (k, v)
    assert spec.past_outputs == outputs[1:] and outputs[0] == spec.logits == "logits"
    assert all(n.startswith("input.past_key_values.layers.") for n in spec.past_inputs)
    assert (spec.num_kv_heads, spec.head_dim, spec.kv_dtype) == (2, 16, "float32")
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch
    assert spec.stop_token_ids == [Decoder(exported_causal).tokenizer.token_to_id("<|im_end|>")]
    assert DecoderSpec(**spec.to_dict()) == spec


def test_fp32_and_int8_greedy_match_torch(exported_causal, torch_model, prompt_ids):
    spec = DecoderSpec.load(exported_causal / "decoder.json")
    prompt_ids = prompt_ids[::3]
    reference = torch_greedy(torch_model, prompt_ids, 32, spec.stop_token_ids)
    assert any(len(r) > 5 for r in reference)  # the trained model says something
    fp32 = Decoder(exported_causal, model="model.fp32.onnx")
    assert [fp32.generate(ids, max_new_tokens=32, constrain=False).token_ids
            for ids in prompt_ids] == reference
    int8 = Decoder(exported_causal)
    same = [int8.generate(ids, max_new_tokens=32, constrain=False).token_ids == r
            for ids, r in zip(prompt_ids, reference)]
    assert sum(same) >= 0.2 * len(same)


def test_int4_graph_is_one_smaller_file_and_decodes(exported_causal, torch_model, prompt_ids,
                                                    tmp_path):
    import shutil

    for name in ("decoder.json", "tokenizer.json", "chat.json"):
        shutil.copyfile(exported_causal / name, tmp_path / name)
    quantize(exported_causal / "model.fp32.onnx", tmp_path / "model.onnx", "int4", output="logits")
    assert [p.name for p in tmp_path.glob("model.onnx*")] == ["model.onnx"]
    assert (tmp_path / "model.onnx").stat().st_size < (exported_causal / "model.onnx").stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    spec = DecoderSpec.load(tmp_path / "decoder.json")
    reference = torch_greedy(torch_model, prompt_ids[:6], 16, spec.stop_token_ids)
    int4 = [Decoder(tmp_path).generate(ids, max_new_tokens=16, constrain=False).token_ids
            for ids in prompt_ids[:6]]
    assert all(len(t) > 0 for t in int4)
    assert sum(a == b for a, b in zip(int4, reference)) >= 1


def test_parity_prompts_cover_extract_records_too():
    spec = causal_spec("extract")
    prompts = parity_prompts([extract_record(i) for i in range(30)], spec, ChatFormat())
    assert len(prompts) == 24
    assert all(p.endswith("<|im_start|>assistant\n") and "Answer with JSON" in p for p in prompts)
    agent = parity_prompts([agent_record(i) for i in range(3)], causal_spec("agent"), ChatFormat())
    assert len(agent) == 6  # all of them when fewer than 24
    assert agent[1].count("<|im_start|>tool\n") == 1  # the second turn's prompt holds the call


def test_long_prompts_keep_their_tail():
    assert fit_context(list(range(10)), 12, 4) == list(range(2, 10))
    assert fit_context(list(range(5)), 12, 4) == list(range(5))


def test_measure_parity_counts_identical_sequences():
    parity = measure_parity([[1, 2], [3], [4, 5]], [[1, 2], [3], [4, 5]], [[1, 2], [3, 9], [4, 5]])
    assert (parity.fp32_exact, parity.first_fp32_mismatch) == (1.0, None)
    assert parity.shipped_agreement == pytest.approx(2 / 3)


def test_shipped_parity_below_the_gate_names_figure_and_remedy():
    with pytest.raises(StageError) as err:
        check_parity(Parity(20, 1.0, 0.85, None), ["p"] * 20, "int4", 0.99)
    assert "85.0% of 20" in str(err.value) and "int4" in str(err.value)
    assert "export.quantize: none" in err.value.hint and "min_parity" in err.value.hint
    check_parity(Parity(20, 1.0, 0.85, None), ["p"] * 20, "int4", 0.8)  # above: passes


def test_fp32_mismatch_names_the_first_differing_prompt():
    with pytest.raises(StageError) as err:
        check_parity(Parity(4, 0.75, 1.0, 2), ["a", "b", "the third prompt", "d"], "none", 0.5)
    assert "25.0% of 4" in str(err.value) and "the third prompt" in str(err.value)


def test_export_is_keyed_on_what_parity_prompts_read():
    assert {"description", "output", "tools", "input", "export", "task"} <= set(export.KEYED_ON)
