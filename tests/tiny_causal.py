"""Builders for hermetic causal-LM tests: fixture tools, agent traces and extractions, a byte-level
BPE tokenizer trained on them and a tiny Llama decoder. Nothing is downloaded; all deterministic.

The traces are regular on purpose (a tool per request kind, arguments copied from the user's
words), so a ~100k-parameter decoder learns them in a few hundred steps."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

TOOLS = (
    {"name": "get_order", "description": "Look up an order by id.",
     "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                    "required": ["order_id"]}},
    {"name": "cancel_order", "description": "Cancel an order.",
     "parameters": {"type": "object",
                    "properties": {"order_id": {"type": "string"},
                                   "reason": {"enum": ["changed_mind", "too_late", "other"]}},
                    "required": ["order_id", "reason"]}},
)
# The fixture's tools as users paste real ones: a $ref into $defs, a pattern, a format, bounds
# inside an anyOf. Every keyword is enforced by the constraint (llguidance), none refused.
RICH_TOOLS = (
    {"name": "get_order", "description": "Look up an order by id.", "parameters": {
        "type": "object", "$defs": {"id": {"type": "string", "pattern": "^A[0-9]{2}$"}},
        "properties": {"order_id": {"$ref": "#/$defs/id"}}, "required": ["order_id"]}},
    {"name": "cancel_order", "description": "Cancel an order.", "parameters": {
        "type": "object", "properties": {
            "order_id": {"type": "string", "pattern": "^A[0-9]{2}$"},
            "reason": {"enum": ["changed_mind", "too_late", "other"]},
            "when": {"type": "string", "format": "date"},
            "refund": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 500},
                                 {"const": "full"}]}},
        "required": ["order_id", "reason"]}},
)
EXTRACT_SCHEMA = {"type": "object",
                  "properties": {"order_id": {"type": "string"},
                                 "issue": {"enum": ["late", "damaged", "other"]},
                                 "refund": {"type": "boolean"}},
                  "required": ["order_id", "issue", "refund"]}
ORDER_IDS = tuple(f"A{n}" for n in range(10, 40))
ISSUES = {"late": "has not arrived yet", "damaged": "came broken", "other": "is the wrong colour"}


def agent_trace(i: int) -> list[dict]:
    """Conversation i: a lookup (even i) or a cancellation (odd i), then a short reply."""
    order = ORDER_IDS[i % len(ORDER_IDS)]
    if (i + i // len(ORDER_IDS)) % 2 == 0:  # past the first 30, every order gets both kinds
        user, name, args = f"where is order {order}", "get_order", {"order_id": order}
        result, reply = {"status": "shipped"}, f"Order {order} has shipped."
    else:
        user, name = f"please cancel order {order}", "cancel_order"
        args = {"order_id": order, "reason": "changed_mind"}
        result, reply = {"cancelled": True}, f"Order {order} is cancelled."
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps(result)},
            {"role": "assistant", "content": reply}]


def extraction(i: int) -> tuple[str, dict]:
    # The first 30 cycle together; later ones pair each order with every issue and refund.
    n = len(ORDER_IDS)
    order = ORDER_IDS[i % n]
    issue = ("late", "damaged", "other")[(i + i // n) % 3]
    refund = (i + i // (3 * n)) % 2 == 0
    text = f"my order {order} {ISSUES[issue]}" + (", I want my money back" if refund else "")
    return text, {"order_id": order, "issue": issue, "refund": refund}


def _id(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def agent_record(i: int) -> dict:
    messages = agent_trace(i)
    return {"id": _id(messages), "input": None, "target": None, "messages": messages, "soft": None,
            "gold": None, "cohort": "log", "source": "log",
            "provenance": {"request": None, "model": "test", "cost_usd": 0.0, "log": None}}


def extract_record(i: int) -> dict:
    text, target = extraction(i)
    return {"id": _id(text), "input": {"message": text}, "target": target, "messages": None,
            "soft": None, "gold": None, "cohort": "log", "source": "log",
            "provenance": {"request": None, "model": "test", "cost_usd": 0.0, "log": None}}


def write_causal_splits(root: Path, task: str, train: Iterable[int], val: Iterable[int],
                        test: Iterable[int] = ()) -> Path:
    """train/val/test.jsonl of agent traces or extractions, as the curate stage writes them."""
    make = agent_record if task == "agent" else extract_record
    root.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        lines = [json.dumps(make(i), sort_keys=True) for i in ids]
        (root / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return root


def fixture_chat_text() -> list[str]:
    """Rendered fixture conversations: what the tokenizer is trained on."""
    from distill_compiler.runtime.chat_format import ChatFormat

    chat = ChatFormat()
    system = chat.system_text("Fixture shop assistant.", TOOLS)
    texts = [chat.render(chat.prepare(agent_trace(i), system, TOOLS)) for i in range(40)]
    for i in range(40):
        text, target = extraction(i)
        texts.append(chat.render(chat.prepare(
            [{"role": "user", "content": text},
             {"role": "assistant", "content": json.dumps(target)}], "Extract.")))
    return texts


# --------------------------------------------------------------------------- tokenizer + decoder

SPECIALS = ("<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>")


def build_chat_tokenizer(texts: Sequence[str], vocab_size: int = 400):
    """A byte-level BPE (every byte has a token, as constrained decoding needs) with the chat
    markers as special tokens, wrapped for transformers with the distill chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill_compiler.runtime.chat_format import ChatFormat

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"], model_input_names=["input_ids", "attention_mask"])
    wrapped.chat_template = ChatFormat().jinja_template()
    return wrapped


def build_tiny_llama(path: Path, texts: Sequence[str] | None = None, hidden: int = 64,
                     layers: int = 2, seed: int = 0) -> Path:
    """Save an untrained Llama-style decoder (GQA 4/2, untied head) and its tokenizer to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_chat_tokenizer(texts if texts is not None else fixture_chat_text())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def causal_spec(task: str, **sections):
    """An agent (fixture TOOLS) or extract (EXTRACT_SCHEMA) spec; keywords replace sections."""
    from distill_compiler.spec.models import Spec

    data = {"name": "tiny", "task": task, "teacher": {"logs": ["log.jsonl"]}}
    if task == "agent":
        data.update(description="Fixture shop assistant.", tools=list(TOOLS))
    else:
        data.update(description="Extract the order issue.", output={"schema": EXTRACT_SCHEMA})
    return Spec.model_validate({**data, **sections})


def train_tiny_causal(root: Path, train_ids: Sequence[int], steps: int = 100,
                      seed: int = 0) -> Path:
    """A train-stage artifact (model/ + chat.json) of the tiny Llama fitted to agent traces and
    extractions `train_ids`, both rendered under causal_spec: a plain causal-LM loop over whole
    conversations, long enough that greedy outputs follow the fixtures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.students.causal.data import conversation

    chat = ChatFormat()
    texts = [chat.render(conversation(make(i), causal_spec(task), chat))
             for task, make in (("agent", agent_record), ("extract", extract_record))
             for i in train_ids]
    build_tiny_llama(root / "model", texts, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread costs more than it brings
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(texts), (8,), generator=generator)
        width = int(batch["attention_mask"][rows].sum(1).max())  # right-padded: trim the tail
        loss = model(input_ids=batch["input_ids"][rows, :width],
                     attention_mask=batch["attention_mask"][rows, :width],
                     labels=labels[rows, :width]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.set_num_threads(threads)
    model.eval().save_pretrained(root / "model")
    (root / "chat.json").write_text(json.dumps(chat.to_dict()))
    return root


def fp32_export(root: Path, exported: Path) -> Path:
    """The export artifact with its fp32 graph as model.onnx: for tests that compare logits,
    which dynamic int8 quantization moves with the batch (one activation scale per run)."""
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    for item in exported.iterdir():
        if item.is_file() and item.name != "model.onnx":
            shutil.copyfile(item, root / item.name)
    (root / "model.fp32.onnx").rename(root / "model.onnx")
    return root


def write_causal_bundle(root: Path, exported: Path, task: str, teacher: dict,
                        threshold: float = 0.0) -> Path:
    """An agent or extract bundle around the exported tiny decoder: its graph, tokenizer,
    decoder.json and chat.json, policy.json as evaluate writes it (a `lawyer` trigger sends a
    turn to `teacher`), and a manifest that load_bundle verifies."""
    import shutil

    from distill_compiler.runtime.chat_format import ChatFormat
    from distill_compiler.runtime.format import (
        DECODER_FILES,
        MANIFEST_FILE,
        MODEL_FILE,
        POLICY_FILE,
        TOKENIZER_FILE,
        manifest_dict,
        sha256_file,
        write_policy,
    )
    from distill_compiler.students.causal.evaluate import policy_dict

    root.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, TOKENIZER_FILE, *DECODER_FILES):
        shutil.copyfile(exported / name, root / name)
    spec = causal_spec(task, teacher=teacher, export={"max_new_tokens": 48},
                       escalation={"triggers": [{"pattern": "(?i)lawyer", "reason": "legal"}]})
    write_policy(root / POLICY_FILE, policy_dict(spec, ChatFormat(), threshold))
    files = {n: sha256_file(root / n) for n in (MODEL_FILE, TOKENIZER_FILE, POLICY_FILE,
                                                *DECODER_FILES)}
    manifest = manifest_dict(f"tiny-{task}", task, "0" * 64, files, {}, {})
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root
