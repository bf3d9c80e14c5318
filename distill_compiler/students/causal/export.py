"""Export a trained causal-LM student (extract, agent) to one ONNX decode graph with a KV cache,
quantize it, and gate on greedy-decoding parity.

The graph comes from `transformers.exporters`: `decompose_for_generation(multi_token_decode=True)`
splits generation into a prefill and a multi-token decode, and only the decode is exported,
since fed an empty cache it *is* the prefill: one graph, one copy of the weights (what
`export_for_generation` would do, minus tracing a prefill graph nobody ships). The sample batch
is 2 and left-padded, so batch, sequence and cache axes all stay dynamic.

Parity is measured the way the student ships: the runtime's own `runtime.decoder.Decoder` (plain
greedy, no constraint) on validation prompts, against the torch model's greedy `generate` on the
same token ids. The fp32 graph must match exactly; the shipped (quantized) one on at least
`export.min_parity` of the prompts.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.records import read_jsonl
from ...errors import StageError
from ...runtime.chat_format import ChatFormat
from ...runtime.decoder import Decoder, DecoderSpec
from ..quantize import quantize
from ..quiet import quiet_export, quiet_training_libraries
from .data import points

PARITY_PROMPTS = 24      # validation prompts decoded by torch and by each graph
PARITY_MAX_TOKENS = 64   # greedy tokens per parity prompt (at most export.max_new_tokens)
PROTOBUF_LIMIT = 2_000_000_000  # one .onnx file holds at most 2 GB, weights included
# Two texts of different lengths, left-padded: batch 2 and seq > 1, so torch.export keeps both
# axes dynamic (it specialises dims of size 1) and the graph takes an attention_mask.
TRACE_TEXTS = ("hello", "a somewhat longer text to trace the sequence axis")
KV_INPUT, KV_OUTPUT = "input.past_key_values.", "output.past_key_values."
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


# --------------------------------------------------------------------------- export

def export_fp32(model, tokenizer, path: Path) -> None:
    """Trace the multi-token decode graph and save it as `path` (weights inside when < 2 GB)."""
    import onnx_ir
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_for_generation

    tokenizer.padding_side = "left"
    sample = dict(tokenizer(list(TRACE_TEXTS), return_tensors="pt", padding=True,
                            add_special_tokens=False))
    decode, decode_inputs = decompose_for_generation(model.eval(), sample,
                                                     multi_token_decode=True)["decode"]
    program = OnnxExporter().export(decode, decode_inputs, OnnxConfig(dynamic=True)).program
    weights = sum(v.const_value.nbytes for v in program.graph.initializers.values()
                  if v.const_value is not None)
    if weights < PROTOBUF_LIMIT:
        onnx_ir.save(program, str(path))
    else:
        onnx_ir.save(program, str(path), external_data=f"{path.name}.data")


def ship(fp32: Path, shipped: Path, kind: str) -> None:
    """model.onnx: the quantized graph, or for `none` the fp32 graph when it fits one file."""
    if kind != "none":
        quantize(fp32, shipped, kind, output="logits")
        return
    if fp32.with_name(f"{fp32.name}.data").exists():
        raise StageError("export", "the fp32 model is over 2 GB, too large for one model.onnx",
                         "set export.quantize: int8 (or int4)")
    shutil.copyfile(fp32, shipped)


def decoder_spec(graph: Path, config, chat: ChatFormat, tokenizer) -> DecoderSpec:
    """decoder.json, read off the exported graph: its names, cache layout and logits width."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past_inputs = [n for n in inputs if n.startswith(KV_INPUT)]
    past_outputs = [KV_OUTPUT + n[len(KV_INPUT):] for n in past_inputs]
    missing = [n for n in ["input_ids", "logits", *past_outputs] if n not in {**inputs, **outputs}]
    if missing or not past_inputs:
        raise StageError("export", f"the exported graph lacks {missing or 'a KV cache'}",
                         "transformers.exporters changed its naming: pin transformers==5.23.0")
    kv = inputs[past_inputs[0]]
    end_id = tokenizer.convert_tokens_to_ids(chat.end)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise StageError("export", f"the tokenizer has no token for the end marker {chat.end!r}",
                         "train must add the chat markers as special tokens")
    return DecoderSpec(
        input_ids="input_ids", logits="logits",
        position_ids="position_ids" if "position_ids" in inputs else None,
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        past_inputs=past_inputs, past_outputs=past_outputs,
        num_kv_heads=int(kv.shape[1]), head_dim=int(kv.shape[3]),
        kv_dtype=ORT_DTYPES[kv.type], vocab_size=int(outputs["logits"].shape[-1]),
        context_length=int(config.max_position_embeddings), stop_token_ids=[int(end_id)])


# --------------------------------------------------------------------------- parity

def parity_prompts(val: list[dict], spec, chat: ChatFormat) -> list[str]:
    """Up to PARITY_PROMPTS rendered prompts, evenly spread over the validation points."""
    prompts = [chat.render(p.prompt, add_generation_prompt=True)
               for record in val for p in points(record, spec, chat)]
    if len(prompts) <= PARITY_PROMPTS:
        return prompts
    return [prompts[int(i)] for i in np.linspace(0, len(prompts) - 1, PARITY_PROMPTS)]


def fit_context(ids: list[int], context: int, new_tokens: int) -> list[int]:
    """The prompt's last tokens, leaving room for `new_tokens` (both sides get the same ids)."""
    return ids[-(context - new_tokens):] if len(ids) + new_tokens > context else ids


def torch_greedy(model, prompts: list[list[int]], max_new_tokens: int, stop: list[int]
                 ) -> list[list[int]]:
    from transformers import GenerationConfig

    # A fresh config: a base model's own (sampling, repetition penalty) must not bend greedy.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=stop[0])
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            out.append(y[0, len(ids):].tolist())
    return out


def onnx_greedy(decoder: Decoder, prompts: list[list[int]], max_new_tokens: int
                ) -> list[list[int]]:
    return [decoder.generate(ids, None, max_new_tokens, constrain=False).token_ids
            for ids in prompts]


@dataclass
class Parity:
    n: int
    fp32_exact: float
    shipped_agreement: float
    first_fp32_mismatch: int | None  # index of the first prompt where fp32 strays


def measure_parity(reference: list[list[int]], fp32: list[list[int]], shipped: list[list[int]]
                   ) -> Parity:
    same_fp32 = [a == b for a, b in zip(reference, fp32)]
    same_shipped = [a == b for a, b in zip(reference, shipped)]
    first = next((i for i, same in enumerate(same_fp32) if not same), None)
    return Parity(len(reference), float(np.mean(same_fp32)), float(np.mean(same_shipped)), first)


def check_parity(parity: Parity, prompts: list[str], quantize_kind: str, min_parity: float
                 ) -> None:
    if parity.first_fp32_mismatch is not None:
        raise StageError(
            "export", f"the fp32 ONNX graph decodes differently from the trained model on "
            f"{1 - parity.fp32_exact:.1%} of {parity.n} validation prompts, first on: "
            f"{prompts[parity.first_fp32_mismatch][-200:]!r}",
            "the unquantized export should match exactly: this points at the exporter; "
            "please report it with the model's config")
    if parity.shipped_agreement >= min_parity:
        return
    raise StageError(
        "export", f"the {quantize_kind} model's greedy outputs equal the trained model's on "
        f"{parity.shipped_agreement:.1%} of {parity.n} validation prompts (< {min_parity:.1%})",
        "use export.quantize: none (or int8 rather than int4), or lower export.min_parity "
        f"(now {min_parity})")


# --------------------------------------------------------------------------- stage body

def export_causal(train_dir: Path, splits_dir: Path, out: Path, spec, reporter) -> dict:
    """Write model.onnx, model.fp32.onnx, tokenizer.json, chat.json, decoder.json and
    parity.json into `out`; return the stage summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    export = spec.export
    chat = ChatFormat.from_dict(json.loads((train_dir / "chat.json").read_text()))
    prompts = parity_prompts(list(read_jsonl(splits_dir / "val.jsonl")), spec, chat)
    if not prompts:
        raise StageError("export", "the validation split is empty, so parity cannot be checked",
                         "give curate more examples (data.holdout sets the validation share)")
    if not (train_dir / "model" / "tokenizer.json").is_file():
        raise StageError("export", f"the trained model has no tokenizer.json ({train_dir / 'model'})",
                         "the student's tokenizer must be a `tokenizers` fast tokenizer")
    quiet_training_libraries()
    model = AutoModelForCausalLM.from_pretrained(train_dir / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(train_dir / "model")

    fp32, shipped = out / "model.fp32.onnx", out / "model.onnx"
    reporter.log("export: tracing the decoder to ONNX (one graph, KV cache)")
    with quiet_export():
        export_fp32(model, tokenizer, fp32)
        if export.quantize != "none":
            reporter.log(f"export: quantizing weights to {export.quantize}")
        ship(fp32, shipped, export.quantize)
    shutil.copyfile(train_dir / "model" / "tokenizer.json", out / "tokenizer.json")
    (out / "chat.json").write_text(json.dumps(chat.to_dict(), indent=2))
    decoder = decoder_spec(fp32, model.config, chat, tokenizer)
    (out / "decoder.json").write_text(json.dumps(decoder.to_dict(), indent=2))

    new_tokens = min(export.max_new_tokens, PARITY_MAX_TOKENS)
    reporter.log(f"export: checking greedy parity on {len(prompts)} validation prompts "
                 f"({new_tokens} tokens each)")
    runtime = Decoder(out, model=fp32.name)
    ids = [fit_context(runtime.encode(p), decoder.context_length, new_tokens) for p in prompts]
    reference = torch_greedy(model, ids, new_tokens, decoder.stop_token_ids)
    fp32_out = onnx_greedy(runtime, ids, new_tokens)
    shipped_out = (fp32_out if export.quantize == "none"
                   else onnx_greedy(Decoder(out), ids, new_tokens))
    parity = measure_parity(reference, fp32_out, shipped_out)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    (out / "parity.json").write_text(json.dumps(
        {"quantize": export.quantize, "n": parity.n, "fp32_exact": parity.fp32_exact,
         "shipped_agreement": parity.shipped_agreement, "max_new_tokens": new_tokens,
         "sizes": sizes, "seconds": round(time.perf_counter() - started, 2)}, indent=2))
    check_parity(parity, prompts, export.quantize, export.min_parity)
    return {"quantize": export.quantize, "agreement": round(parity.shipped_agreement, 4),
            "size_mb": round(sizes["model.onnx"] / 1e6, 2)}
