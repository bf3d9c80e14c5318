"""Train a causal-LM student (tasks extract and agent) on the teacher's curated conversations.

TRL drives the training; this module only decides what it is fed and how:

- sft: `SFTTrainer` on every curated conversation rendered with the chat format, loss on the
  assistant turns only (the template's `{% generation %}` markers). TRL projects through the LM
  head only the positions that carry a label (its fused head), so the [sequence x vocabulary]
  logits of the prompt tokens are never built; batches are grouped by length, so padding stays
  short. After each epoch the model answers a fixed validation subset with the runtime's
  constraint (validate.py), and the epoch that agrees best with the teacher ships; early
  stopping (`student.patience`) reads the same score.
- epochs 0: no training at all; the base as it is, with the constraint, is the zero-shot floor
  a trained student has to beat.
- gkd: the same SFT first, then one pass of on-policy distillation (`DistillationTrainer`, a
  generalized JSD against the local `student.teacher_model`) over every assistant turn's prompt.
  The SFT warm start matters: on-policy distillation grades the student's own samples, and an
  untrained student samples noise the teacher's distribution says little useful about (the GKD
  paper starts from an SFT'd student too). The stable DistillationTrainer is used rather than the
  experimental GKDTrainer: the SFT phase already is GKD's off-policy half.

With `student.lora`, both phases train adapters (plus the rows of any turn markers the
tokenizer lacked), merged into the weights before saving: what ships is a plain fp32 model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ...data.records import read_jsonl
from ...errors import StageError
from ...runtime.chat_format import ChatFormat
from ..device import pick_device
from ..processes import launched_ranks, wait_for_everyone
from ..quiet import quiet_enabled, quiet_training_libraries
from .base import SCRATCH, Base, load_base, with_chat_markers
from .data import conversation, points
from .validate import SelectOnValidation, StructuredValidation

LOG_POINTS = 50        # train-loss entries kept in the log over the whole run
MICRO_BATCH_TOKENS = 2048  # padded tokens per forward pass (see micro_batch)
MAX_EVALUATIONS = 8        # validation decodes per run (see evaluation_args)


def train_causal(splits_dir: Path, out: Path, spec, spec_dir: Path, cache_dir: Path,
                 reporter) -> dict:
    """Train per `spec.student` on curate's train/val.jsonl; write model/, chat.json and
    train_log.json into `out`; return the stage summary. `spec` needs task, description, input,
    output, tools and student."""
    from transformers import set_seed

    started = time.perf_counter()
    quiet_training_libraries()
    if quiet_enabled():  # TRL tokenizes through datasets.map, which draws its own bars
        import datasets

        datasets.disable_progress_bars()
    student = spec.student
    train, val = read_split(splits_dir / "train.jsonl"), read_split(splits_dir / "val.jsonl")
    if not train:
        raise StageError("train", "the training split is empty", "generate or log more examples")
    set_seed(student.seed)  # before building: a scratch model's initialisation draws from it
    base = load_base(student.base, spec_dir, cache_dir,
                     [ChatFormat().render(conversation(r, spec, ChatFormat())) for r in train])
    chat, added = with_chat_markers(base)
    # Before training, so a teacher that cannot work fails the stage in seconds, not after SFT.
    teacher = (load_teacher(student.teacher_model, base.tokenizer, spec_dir, cache_dir)
               if student.method == "gkd" else None)
    device = pick_device(student.device)
    reporter.log(f"train: {len(train)} conversations on {device.type}, base {student.base}"
                 + (f" (+{len(added)} chat tokens)" if added else ""))

    rank, world = launched_ranks()
    workdir = trainer_workdir(cache_dir, splits_dir, student)
    if student.epochs == 0:
        model, log = base.model, {"sft": untrained_log()}
    else:
        validation = StructuredValidation(val, spec, chat, base.tokenizer,
                                          base.tokenizer.convert_tokens_to_ids(chat.end))
        sft = sft_trainer(base, added, spec, chat, train, val, validation, device, reporter,
                          workdir)
        sft.train()
        log = {"sft": trainer_log(sft, validation)}
        if teacher is not None:
            log["distillation"] = distill(sft.model, teacher, base.tokenizer, spec, chat, train,
                                          device, reporter, workdir)
            if val:  # the same measures as after each SFT epoch, so the two phases compare
                log["distillation"].update(evaluation_log(sft.evaluate(), validation))
        model = sft.model
    model = finished(model)
    if world > 1:  # every process has loaded the best epoch from workdir before it goes
        wait_for_everyone()
    if rank > 0:
        return {}  # the main process writes the checkpoint
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {"device": device.type, "processes": world, "method": student.method,
               "steps": sum(phase["steps"] for phase in log.values()),
               "val_loss": final_val_loss(log), "seconds": round(time.perf_counter() - started, 2),
               "params": sum(p.numel() for p in model.parameters())}
    write_checkpoint(out, model, base.tokenizer, chat, {
        **summary, "base": student.base, "base_source": base.source, "task": spec.task,
        "added_tokens": base.tokenizer.convert_ids_to_tokens(added),
        "lora": student.lora and student.lora.model_dump(mode="json"),
        "hyperparameters": hyperparameters(student), "train_conversations": len(train),
        "val_conversations": len(val), **log})
    return summary


def trainer_workdir(cache_dir: Path, splits_dir: Path, student) -> Path:
    """Trainer's output_dir, where best-epoch checkpoints go: the same path in every process of
    a multi-process run (each loads the best epoch from it), distinct per data and settings."""
    ident = json.dumps([str(splits_dir), student.model_dump(mode="json")], sort_keys=True)
    return Path(cache_dir) / "tmp" / f"trainer-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def read_split(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.is_file() else []


# --------------------------------------------------------------------------- SFT

def sft_trainer(base: Base, added: list[int], spec, chat: ChatFormat, train: list[dict],
                val: list[dict], validation: StructuredValidation, device: torch.device, reporter,
                workdir: Path, share_prefix: bool = True):
    """TRL's SFTTrainer for the spec, running each micro-batch's shared prefix once
    (shared_prefix.py) unless `share_prefix` is False or several processes train."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig

    from .shared_prefix import SharedPrefixSFTTrainer

    student = spec.student
    conversations = [conversation(r, spec, chat) for r in train]
    longest, shared = batch_shape(base.tokenizer, chat, conversations, student.max_length)
    share_prefix = share_prefix and launched_ranks()[1] == 1  # see SharedPrefixSFTTrainer
    if not share_prefix:
        shared = 0
    micro = micro_batch(student.batch_size, longest, shared)
    steps_per_epoch = math.ceil(len(train) / student.batch_size)
    callbacks = [SelectOnValidation(validation, reporter)] if validation else []
    if validation and student.patience > 0:
        callbacks.append(EarlyStoppingCallback(student.patience))  # reads the score above
    args = SFTConfig(
        **{**common_args(student, device, student.epochs, steps_per_epoch, workdir, micro),
           **(evaluation_args(validation.metric, student.epochs, steps_per_epoch)
              if validation else {})},
        assistant_only_loss=True, train_sampling_strategy="group_by_length",
        max_length=student.max_length, eos_token=chat.end, per_device_eval_batch_size=micro)
    trainer = SharedPrefixSFTTrainer(
        model=base.model, args=args, processing_class=base.tokenizer,
        train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
        eval_dataset=Dataset.from_list([{"messages": conversation(r, spec, chat)} for r in val])
        if val else None,
        peft_config=lora_config(student.lora, base.model, added), callbacks=callbacks,
        share_prefix=share_prefix)
    return with_reporting(trainer, "fine-tuning", reporter)


def batch_shape(tokenizer, chat: ChatFormat, conversations: list[list[dict]],
                max_length: int) -> tuple[int, int]:
    """(longest, shared): the longest conversation in tokens (at most max_length) and the
    leading tokens every conversation has in common (the system turn, when they all share
    one), which bound what one forward pass holds (see micro_batch)."""
    ids = [tokenizer(chat.render(c), add_special_tokens=False)["input_ids"]
           for c in conversations]
    longest = min(max_length, max(map(len, ids)))
    return longest, min(len(os.path.commonprefix(ids)), longest - 1)


def evaluation_args(metric: str, epochs: float, steps_per_epoch: int) -> dict:
    """Evaluate after every epoch, at most MAX_EVALUATIONS times a run (a long run of a small
    student evaluates every few epochs instead: each evaluation decodes the validation points),
    and keep the evaluation whose constrained answers agree best with the teacher's
    (validate.py), not the one with the lowest validation loss: on the support-agent example
    the loss was lowest at epoch 5 of 20 while tool choice kept improving."""
    if epochs <= MAX_EVALUATIONS:
        when = dict(eval_strategy="epoch", save_strategy="epoch")
    else:
        every = math.ceil(epochs * steps_per_epoch / MAX_EVALUATIONS)
        when = dict(eval_strategy="steps", eval_steps=every, save_strategy="steps",
                    save_steps=every)
    return dict(**when, save_total_limit=1, load_best_model_at_end=True,
                metric_for_best_model=f"eval_{metric}", greater_is_better=True,
                save_only_model=True)


def common_args(student, device: torch.device, epochs: float, steps_per_epoch: int,
                workdir: Path, micro: int) -> dict:
    """TrainingArguments both phases share: the spec's optimisation settings, the device, and
    Trainer's own checkpoints, reports and progress bars off (the stage reports progress)."""
    on_gpu = device.type == "cuda"
    return dict(
        output_dir=str(workdir), num_train_epochs=epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=math.ceil(student.batch_size / micro),
        learning_rate=student.learning_rate,
        # A float below 1 is a fraction of all steps (transformers 5 folded warmup_ratio into it).
        warmup_steps=float(student.warmup_ratio), weight_decay=student.weight_decay,
        lr_scheduler_type="linear", seed=student.seed, data_seed=student.seed,
        # bf16 autocast over fp32 weights on GPU (the checkpoint stays fp32); plain fp32 on CPU.
        bf16=on_gpu, use_cpu=not on_gpu,
        # TRL defaults it on; small models gain nothing and generate() breaks after it (STACK.md).
        activation_checkpointing=False, include_num_input_tokens_seen="non_padding",
        logging_strategy="steps",
        logging_steps=max(1, math.ceil(epochs * steps_per_epoch / LOG_POINTS)),
        save_strategy="no", report_to="none", disable_tqdm=True)


def micro_batch(batch_size: int, longest: int, shared: int = 0) -> int:
    """Sequences per forward pass: `student.batch_size` is what one optimiser step sees, but
    activations grow with tokens per pass, so long sequences go through in smaller passes with
    gradients accumulated. Measured on smollm2-135m, 8 x 768 tokens per pass held 14 GB. A
    prefix every row shares runs once per pass (shared_prefix.py), so only the rest of each
    row counts per row. A divisor of `batch_size`, so that the accumulated passes of a step
    add up to exactly `batch_size` sequences."""
    fits = max(1, (MICRO_BATCH_TOKENS - shared) // max(1, longest - shared))
    return max(n for n in range(1, min(batch_size, fits) + 1) if batch_size % n == 0)


def lora_config(lora, model, added: list[int]):
    """peft's LoraConfig for `student.lora` (None: train every weight). Added tokens' rows must
    train too, or the model could never read or emit the new turn markers: peft's trainable
    tokens for the input embedding; an untied output head is trained whole (peft's trainable
    tokens do not wrap a Linear head)."""
    if lora is None:
        return None
    from peft import LoraConfig

    rows, whole = None, None
    if added:
        rows = {embedding_name(model, model.get_input_embeddings()): added}
        if not model.config.tie_word_embeddings:
            whole = [embedding_name(model, model.get_output_embeddings())]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), trainable_token_indices=rows,
                      modules_to_save=whole, task_type="CAUSAL_LM")


def embedding_name(model, module) -> str:
    """The module's own name (e.g. `embed_tokens`, `lm_head`), the way peft matches modules."""
    return next(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m is module)


# --------------------------------------------------------------------------- distillation

def distill(model, teacher, tokenizer, spec, chat: ChatFormat, train: list[dict],
            device: torch.device, reporter, workdir: Path) -> dict:
    """On-policy distillation from `student.teacher_model`: the student answers every training
    prompt itself and learns the teacher's next-token distribution on its own answer."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student = spec.student
    prompts = [p for r in train for p in points(r, spec, chat)]
    longest = max(len(tokenizer(chat.render([p.target]))["input_ids"]) for p in prompts)
    args = DistillationConfig(
        **common_args(student, device, student.distill_epochs,
                      math.ceil(len(prompts) / student.batch_size), workdir,
                      micro_batch(student.batch_size, student.max_length)),
        beta=student.distill_beta,
        max_completion_length=min(longest, student.max_length))
    tokenizer.padding_side = "left"  # generation appends to the right end of every prompt
    try:
        trainer = DistillationTrainer(
            model=model, teacher_model=teacher, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": p.prompt} for p in prompts]))
        with_reporting(trainer, "distilling", reporter).train()
    finally:
        tokenizer.padding_side = "right"
    return {**trainer_log(trainer), "teacher": student.teacher_model, "prompts": len(prompts),
            "beta": student.distill_beta, "max_completion_length": args.max_completion_length}


def load_teacher(name: str | None, tokenizer, spec_dir: Path, cache_dir: Path):
    """The teacher causal LM, which must read and write the student's exact vocabulary: the
    distillation loss compares the two next-token distributions id by id."""
    if not name:
        raise StageError("train", "student.method gkd needs student.teacher_model",
                         "set it to a local causal LM (path or cached id) sharing the student's "
                         "tokenizer, or use method: sft")
    if SCRATCH.fullmatch(name):
        raise StageError("train", "student.teacher_model must be a trained causal LM, not scratch",
                         "point it at a local model directory or cached id")
    teacher = load_base(name, spec_dir, cache_dir, ())
    with_chat_markers(teacher)
    if teacher.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError("train", f"student.teacher_model '{name}' has a different vocabulary "
                                  "from the student",
                         "on-policy distillation needs a teacher of the same model family "
                         "(same tokenizer); a scratch student can only use method: sft")
    return teacher.model.eval()


# --------------------------------------------------------------------------- progress and logs

def with_reporting(trainer, description: str, reporter):
    """Swap Trainer's printer and progress bar for the stage's reporter."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ReporterCallback(description, reporter))
    return trainer


class ReporterCallback(TrainerCallback):
    """Advances the stage's progress bar by the tokens each optimiser step trained on (so it
    shows tokens/s and an ETA) and logs each validation loss."""

    def __init__(self, description: str, reporter):
        self.description, self.reporter, self.advance, self.seen = description, reporter, None, 0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.advance = self.reporter.progress(f"{self.description} (tokens)",
                                              planned_tokens(train_dataloader, args, state))
        self.seen = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        self.advance(state.num_input_tokens_seen - self.seen)
        self.seen = state.num_input_tokens_seen

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.reporter.log(f"{self.description}: epoch {state.epoch:g}, "
                              f"val loss {metrics['eval_loss']:.4f}")


def planned_tokens(dataloader, args, state) -> int | None:
    """Tokens the run will train on: the dataset's lengths times the epochs, when known."""
    dataset = getattr(dataloader, "dataset", None)
    try:
        per_epoch = sum(len(ids) for ids in dataset["input_ids"])
    except (TypeError, KeyError, ValueError):  # no tokenized column (on-policy prompts)
        return None
    return max(1, int(per_epoch * args.num_train_epochs))


def trainer_log(trainer, validation: StructuredValidation | None = None) -> dict:
    """What one phase did: steps, train loss at each logging step, the validation measures per
    epoch, and which epoch was kept."""
    history = trainer.state.log_history
    # Trainer logs an evaluation before callbacks add to it, so the structured scores come
    # from the validation's own record.
    scores = validation.scores if validation else {}
    epochs = [{"epoch": round(h["epoch"], 3), **evaluation_log(h, None),
               **({f"val_{validation.metric}": round(scores[h["epoch"]], 5)}
                  if h["epoch"] in scores else {})}
              for h in history if "eval_loss" in h]
    kept = best_epoch(epochs, validation)
    return {"steps": trainer.state.global_step,
            "train_loss": [{"step": h["step"], "loss": round(h["loss"], 5)}
                           for h in history if "loss" in h],
            "epochs": epochs,
            "selected_on": f"val_{validation.metric}" if validation else None,
            "best_epoch": kept and kept["epoch"],
            "best_val_loss": kept and kept["val_loss"],
            "tokens": trainer.state.num_input_tokens_seen,
            "seconds": round(next((h["train_runtime"] for h in history
                                   if "train_runtime" in h), 0.0), 2)}


def evaluation_log(metrics: dict, validation: StructuredValidation | None) -> dict:
    out = {"val_loss": round(metrics["eval_loss"], 5)}
    if validation and f"eval_{validation.metric}" in metrics:
        out[f"val_{validation.metric}"] = round(metrics[f"eval_{validation.metric}"], 5)
    return out


def best_epoch(epochs: list[dict], validation: StructuredValidation | None) -> dict | None:
    """The epoch Trainer kept: the first with the best structured score (see evaluation_args)."""
    key = f"val_{validation.metric}" if validation else None
    scored = [e for e in epochs if key in e]
    return max(scored, key=lambda e: e[key]) if scored else None


def untrained_log() -> dict:
    return {"steps": 0, "train_loss": [], "epochs": [], "selected_on": None, "best_epoch": None,
            "best_val_loss": None, "tokens": 0, "seconds": 0.0}


def final_val_loss(log: dict) -> float | None:
    if "val_loss" in log.get("distillation", {}):
        return log["distillation"]["val_loss"]
    if log["sft"].get("best_val_loss") is not None:  # the epoch that was kept
        return log["sft"]["best_val_loss"]
    epochs = log["sft"]["epochs"]
    return epochs[-1]["val_loss"] if epochs else None


def hyperparameters(student) -> dict:
    return {k: getattr(student, k) for k in ("epochs", "learning_rate", "batch_size",
                                             "warmup_ratio", "weight_decay", "max_length", "seed",
                                             "distill_epochs", "distill_beta")}


# --------------------------------------------------------------------------- checkpoint

def finished(model):
    """The trained model as it ships: adapters merged, fp32, on CPU, in eval mode."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(device="cpu", dtype=torch.float32).eval()


def write_checkpoint(out: Path, model, tokenizer, chat: ChatFormat, log: dict) -> None:
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    (out / "chat.json").write_text(json.dumps(chat.to_dict(), indent=2))
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
