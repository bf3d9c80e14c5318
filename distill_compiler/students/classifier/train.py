"""Distil the teacher's labels into an encoder classifier: linear probing, then fine-tuning.

LP-FT (Kumar et al., 2022): a fresh head on a pretrained encoder sends large, random gradients
into features that were already good, and on a few hundred examples fine-tuning then overfits
before it recovers. So the head is first fitted alone on the frozen pooled embeddings (full
batch, L-BFGS, the L2 penalty picked on validation), which is already as good as logistic
regression on sentence embeddings; then everything is fine-tuned from there with a plain torch
loop: `kd_loss.distillation_loss`, a linear warm-up/decay schedule, the encoder at a lower
learning rate than the head, and early stopping on the student's agreement with the teacher's
labels on validation. The probe counts as epoch 0, so fine-tuning only ships if it beats it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.records import read_jsonl
from ...errors import StageError

# The runtime's rendering of a request as text, so training sees exactly what ships sees.
from ...runtime.format import input_text
from ..device import autocast, pick_device
from ..quiet import quiet_training_libraries
from .kd_loss import distillation_loss, soft_targets
from .layer_drop import cut, depth_of
from .model import PooledClassifier, load_student

EVAL_BATCH = 64
# L2 penalties (on the head's weight, added to the mean loss) the probe tries; validation picks.
PROBE_L2 = (1e-5, 1e-4, 1e-3, 1e-2)
PROBE_DEFAULT_L2 = 1e-4  # without a validation split there is nothing to pick by
PROBE_ITERATIONS = 300
# The fitted head learns this much faster than the encoder during fine-tuning: the features
# should move a little towards the task, not be rebuilt around the head (the LP-FT argument).
HEAD_LR_SCALE = 10.0
# With student.layers: where the full-depth model is kept in the train artifact, and the
# summary fields that then describe the shallower model that ships.
FULL_DEPTH = "full_depth"
SHIPPED_FIELDS = ("epochs_run", "best_epoch", "val_agreement", "params")


# --------------------------------------------------------------------------- data

@dataclass
class Split:
    """One split as the trainer sees it: texts, teacher labels, teacher distributions."""

    texts: list[str]
    targets: list[str]
    target_ids: torch.Tensor  # -1 where the label is not in the head (counts as a miss)
    soft: torch.Tensor

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def read(cls, path: Path, labels: list[str], text_field: str | None) -> "Split":
        records = list(read_jsonl(path)) if path.is_file() else []
        index = {label: i for i, label in enumerate(labels)}
        texts = [input_text(r["input"], text_field) for r in records]
        targets = [r["target"] for r in records]
        ids = [index.get(t, -1) for t in targets]
        # A label outside the head only happens in val/test, where such rows count as misses
        # and stay out of the loss, so the label standing in for it does not matter.
        soft = soft_targets([r.get("soft") for r in records],
                            [t if t in index else labels[0] for t in targets], labels)
        return cls(texts, targets, torch.tensor(ids, dtype=torch.long),
                   torch.tensor(soft, dtype=torch.float32).reshape(len(records), len(labels)))

    def rows(self, idx: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        return [self.texts[i] for i in idx.tolist()], self.target_ids[idx], self.soft[idx]


def read_labels(splits_dir: Path) -> list[str]:
    path = splits_dir / "labels.json"
    if not path.is_file():
        raise StageError("train", f"the curated splits have no labels.json ({path})",
                         "re-run curate for a classify task")
    labels = json.loads(path.read_text())
    if len(labels) < 2:
        raise StageError("train", f"need at least two labels to train a classifier, got {labels}",
                         "generate examples for more intents")
    return labels


def encode(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict:
    # Lengths rounded up to a multiple of 8 keep the set of distinct shapes small; the kernels'
    # per-shape setup on first use otherwise dominates small models (a tiny test model's first
    # run went from 17 s to 4 s).
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                    pad_to_multiple_of=8, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def predict_logits(model: PooledClassifier, tokenizer, texts: list[str], max_length: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """fp32 logits on CPU for every text, in batches; the model is left in eval mode."""
    return _batched(model, model.forward, tokenizer, texts, max_length, device,
                    len(model.labels))


@torch.no_grad()
def pooled_embeddings(model: PooledClassifier, tokenizer, texts: list[str], max_length: int,
                      device: torch.device | None = None) -> torch.Tensor:
    """fp32 sentence vectors (what the head reads) on CPU; the model is left in eval mode."""
    return _batched(model, model.embed, tokenizer, texts, max_length, device,
                    model.head.in_features)


def _batched(model, fn, tokenizer, texts, max_length, device, width) -> torch.Tensor:
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(texts), EVAL_BATCH):
        enc = encode(tokenizer, texts[start:start + EVAL_BATCH], max_length, device)
        with autocast(device):
            out.append(fn(**enc).float().cpu())
    return torch.cat(out) if out else torch.empty(0, width)


def agreement(logits: torch.Tensor, target_ids: torch.Tensor) -> float:
    return (logits.argmax(-1) == target_ids).float().mean().item() if len(target_ids) else 0.0


# --------------------------------------------------------------------------- training

@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float | None
    val_agreement: float | None
    seconds: float


def train_classifier(splits_dir: Path, out: Path, student, text_field: str | None,
                     spec_dir: Path, reporter) -> dict:
    """Train per `student` (spec.Student) on curate's splits; write model/, labels.json,
    train_log.json into `out`; return the stage summary. `text_field` is the input property
    the model reads (None: the whole input as canonical JSON, as the runtime does)."""
    from transformers import set_seed

    started = time.perf_counter()
    quiet_training_libraries()
    labels, train, val = read_splits(splits_dir, text_field)
    set_seed(student.seed)  # before loading: the new head's initialisation draws from it
    model, tokenizer = load_student(student.base, spec_dir, labels)
    check_layers(student.layers, model)  # before any training, not after the full-depth model
    device = pick_device(student.device)
    model.to(device)
    alpha = 0.0 if student.method == "ce" else student.alpha
    reporter.log(f"train: {len(train)} examples, {len(labels)} labels on {device.type}, "
                 f"base {student.base}")

    best: Best | None = None
    probe_log = None
    if student.probe:
        probe_log = probe(model, tokenizer, train, val, student, alpha, device)
        reporter.log(f"probe: head fitted on frozen embeddings (l2 {probe_log['l2']:g})"
                     + (f", val agreement {probe_log['val_agreement']:.1%}" if len(val) else ""))
        best = Best.of(model, 0, probe_log["val_agreement"] or 0.0)
    history, steps, total_steps = fine_tune(model, tokenizer, train, val, student, alpha, device,
                                            reporter, best)
    best = history.best
    model.load_state_dict(best.weights)
    summary = {"device": device.type, "epochs_run": len(history.epochs), "best_epoch": best.epoch,
               "val_agreement": round(best.agreement, 4) if len(val) else None,
               "probe_val_agreement": probe_log and probe_log["val_agreement"],
               "params": sum(p.numel() for p in model.parameters())}
    log = {**summary, "base": student.base, "method": student.method, "alpha": alpha,
           "temperature": student.temperature, "steps": steps, "train_examples": len(train),
           "val_examples": len(val), "stopped_early": steps < total_steps,
           "probe": probe_log, "epochs": [vars(r) for r in history.epochs]}
    log["seconds"] = round(time.perf_counter() - started, 2)
    if student.layers:
        # The full-depth model is kept beside the shipped one: it is this step's teacher, and
        # what the shallower student's accuracy and speed are measured against.
        write_checkpoint(out / FULL_DEPTH, model.to("cpu"), tokenizer, labels, log)
        model.to(device)
        model, layers_log = distill_layers(model, tokenizer, train, val, student, alpha, device,
                                           reporter)
        summary = {**summary, **{k: layers_log[k] for k in SHIPPED_FIELDS},
                   "layers": f"{len(layers_log['kept'])} of {layers_log['of']}",
                   "full_depth_val_agreement": summary["val_agreement"]}
        log = {**log, **summary, "full_depth": log, "layers": layers_log,
               "epochs": layers_log["epochs"]}
    summary["seconds"] = log["seconds"] = round(time.perf_counter() - started, 2)
    write_checkpoint(out, model.to("cpu"), tokenizer, labels, log)
    return summary


def read_splits(splits_dir: Path, text_field: str | None) -> tuple[list[str], Split, Split]:
    labels = read_labels(splits_dir)
    train = Split.read(splits_dir / "train.jsonl", labels, text_field)
    val = Split.read(splits_dir / "val.jsonl", labels, text_field)
    if not len(train):
        raise StageError("train", "the training split is empty", "generate or log more examples")
    unknown = sorted({t for t, i in zip(train.targets, train.target_ids.tolist()) if i < 0})
    if unknown:
        raise StageError("train", f"training labels missing from labels.json: {unknown}",
                         "re-run curate; labels.json must list every training label")
    return labels, train, val


# --------------------------------------------------------------------------- linear probe

def probe(model: PooledClassifier, tokenizer, train: Split, val: Split, student, alpha: float,
          device: torch.device) -> dict:
    """Fit `model.head` on the frozen encoder's pooled embeddings of the train split, once per
    L2 penalty in PROBE_L2, keep the one with the best validation agreement (then loss), and
    return what the train log records about it."""
    started = time.perf_counter()
    features = pooled_embeddings(model, tokenizer, train.texts, student.max_length, device)
    val_features = pooled_embeddings(model, tokenizer, val.texts, student.max_length, device)
    grid = []
    for l2 in PROBE_L2 if len(val) else (PROBE_DEFAULT_L2,):
        head = fit_head(features, train, l2, student.temperature, alpha)
        with torch.no_grad():
            val_loss, val_agreement = val_metrics(head(val_features), val, student, alpha)
        grid.append((head, {"l2": l2, "val_loss": val_loss, "val_agreement": val_agreement}))
    head, chosen = max(grid, key=lambda g: (g[1]["val_agreement"] or 0.0,
                                            -(g[1]["val_loss"] or 0.0)))
    model.head.load_state_dict(head.state_dict())
    with torch.no_grad():
        train_loss = distillation_loss(head(features), train.target_ids, train.soft,
                                       student.temperature, alpha).item()
    return {**chosen, "train_loss": round(train_loss, 5),
            "seconds": round(time.perf_counter() - started, 2), "grid": [g for _, g in grid]}


def fit_head(features: torch.Tensor, train: Split, l2: float, temperature: float,
             alpha: float) -> torch.nn.Linear:
    """A linear head minimising the distillation loss + l2 * |W|^2 on fixed features: a
    convex problem, so full-batch L-BFGS from zeros solves it deterministically."""
    head = torch.nn.Linear(features.shape[1], train.soft.shape[1])
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=PROBE_ITERATIONS,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (distillation_loss(head(features), train.target_ids, train.soft, temperature, alpha)
                + l2 * head.weight.pow(2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


# --------------------------------------------------------------------------- fine-tuning

@dataclass
class History:
    epochs: list[EpochResult]
    best: "Best"


def fine_tune(model: PooledClassifier, tokenizer, train: Split, val: Split, student, alpha: float,
              device: torch.device, reporter, best: "Best | None") -> tuple[History, int, int]:
    """Train every weight for up to `student.epochs`, stopping after `student.patience` epochs
    without a better validation agreement than `best` (the probe, when there is one).
    Returns the history with the best epoch's weights, the steps taken and the steps planned."""
    from transformers import get_linear_schedule_with_warmup

    total_steps = max(1, math.ceil(student.epochs * math.ceil(len(train) / student.batch_size)))
    optimizer = torch.optim.AdamW(
        [{"params": model.encoder.parameters(), "lr": student.learning_rate},
         {"params": model.head.parameters(), "lr": student.learning_rate * HEAD_LR_SCALE}],
        weight_decay=student.weight_decay)
    schedule = get_linear_schedule_with_warmup(
        optimizer, round(student.warmup_ratio * total_steps), total_steps)
    order = torch.Generator().manual_seed(student.seed)

    advance = reporter.progress("fine-tuning", total_steps)
    epochs: list[EpochResult] = []
    step, stale = 0, 0
    for epoch in range(1, math.ceil(student.epochs) + 1):
        epoch_start = time.perf_counter()
        batches = torch.randperm(len(train), generator=order).split(student.batch_size)
        batches = batches[:total_steps - step]  # the last epoch may be a fraction of one
        losses = []
        model.train()
        for idx in batches:
            losses.append(train_step(model, tokenizer, train, idx, student, alpha, device,
                                     optimizer, schedule))
            advance(1)
        step += len(batches)

        result = evaluate_epoch(model, tokenizer, val, student, alpha, device, epoch, losses,
                                epoch_start)
        epochs.append(result)
        # Without a validation split every epoch counts as better, so the last one is kept.
        improved = best is None or not len(val) or result.val_agreement > best.agreement
        if improved:
            best = Best.of(model, epoch, result.val_agreement or 0.0)
            stale = 0
        else:
            stale += 1
        reporter.log(describe(result, improved))
        if step == total_steps or (student.patience and stale >= student.patience):
            break
    assert best is not None
    return History(epochs, best), step, total_steps


def train_step(model, tokenizer, train: Split, idx: torch.Tensor, student, alpha: float,
               device: torch.device, optimizer, schedule) -> float:
    """One optimiser step on the rows `idx`; returns the batch loss."""
    texts, target_ids, soft = train.rows(idx)
    with autocast(device):
        logits = model(**encode(tokenizer, texts, student.max_length, device))
    loss = distillation_loss(logits.float(), target_ids.to(device), soft.to(device),
                             student.temperature, alpha)
    loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass
class Best:
    """The best epoch so far (0: the probe) and a CPU copy of its weights."""

    epoch: int
    agreement: float
    weights: dict

    @classmethod
    def of(cls, model, epoch: int, agreement: float) -> "Best":
        return cls(epoch, agreement, {k: v.detach().to("cpu", copy=True)
                                      for k, v in model.state_dict().items()})


# --------------------------------------------------------------------------- layer drop

def check_layers(layers: int | None, model: PooledClassifier) -> None:
    if layers is not None and layers >= (depth := depth_of(model)):
        raise StageError("train", f"student.layers {layers} is not fewer than the base's "
                         f"{depth} layers", f"set student.layers to 1..{depth - 1}, or drop it")


def distill_layers(full: PooledClassifier, tokenizer, train: Split, val: Split, student,
                   alpha: float, device: torch.device, reporter
                   ) -> tuple[PooledClassifier, dict]:
    """The `student.layers`-layer cut of the fine-tuned `full` model (layer_drop.cut), trained
    like the full one but on `full`'s soft labels; the cut itself counts as epoch 0, so
    training only ships if it beats it. Returns the model and what the train log records."""
    started = time.perf_counter()
    teacher = torch.softmax(predict_logits(full, tokenizer, train.texts, student.max_length,
                                           device), dim=-1)
    small, kept = cut(full, student.layers)
    depth = depth_of(full)
    cut_agreement = agreement(predict_logits(small, tokenizer, val.texts, student.max_length,
                                             device), val.target_ids)
    reporter.log(f"layers: kept layers {kept} of {depth}"
                 + (f", val agreement {cut_agreement:.1%} before training" if len(val) else ""))
    # The hard labels stay the teacher's; the soft ones are now the full-depth model's.
    own = Split(train.texts, train.targets, train.target_ids, teacher)
    history, steps, _ = fine_tune(small, tokenizer, own, val, student, alpha, device, reporter,
                                  Best.of(small, 0, cut_agreement))
    small.load_state_dict(history.best.weights)
    return small, {
        "kept": kept, "of": depth, "cut_val_agreement": round(cut_agreement, 4) if len(val) else None,
        "epochs_run": len(history.epochs), "best_epoch": history.best.epoch,
        "val_agreement": round(history.best.agreement, 4) if len(val) else None,
        "params": sum(p.numel() for p in small.parameters()), "steps": steps,
        "seconds": round(time.perf_counter() - started, 2),
        "epochs": [vars(r) for r in history.epochs]}


def write_checkpoint(out: Path, model: PooledClassifier, tokenizer, labels: list[str],
                     log: dict) -> None:
    model.save(out / "model", tokenizer)
    (out / "labels.json").write_text(json.dumps(labels, indent=2))
    (out / "train_log.json").write_text(json.dumps(log, indent=2))


def val_metrics(logits: torch.Tensor, val: Split, student, alpha: float
                ) -> tuple[float | None, float | None]:
    """(loss over rows whose label the head knows, agreement over all rows), rounded; Nones
    for an empty split."""
    if not len(val):
        return None, None
    known = val.target_ids >= 0
    loss = (distillation_loss(logits[known], val.target_ids[known], val.soft[known],
                              student.temperature, alpha).item() if known.any() else None)
    return (None if loss is None else round(loss, 5)), round(agreement(logits, val.target_ids), 4)


def evaluate_epoch(model, tokenizer, val: Split, student, alpha: float, device: torch.device,
                   epoch: int, losses: list[float], epoch_start: float) -> EpochResult:
    logits = predict_logits(model, tokenizer, val.texts, student.max_length, device)
    val_loss, val_agreement = val_metrics(logits, val, student, alpha)
    train_loss = sum(losses) / len(losses) if losses else float("nan")
    return EpochResult(epoch, round(train_loss, 5), val_loss, val_agreement,
                       round(time.perf_counter() - epoch_start, 2))


def describe(r: EpochResult, improved: bool) -> str:
    text = f"epoch {r.epoch}: train loss {r.train_loss:.4f}"
    if r.val_loss is not None:
        text += f", val loss {r.val_loss:.4f}"
    if r.val_agreement is not None:
        text += f", val agreement {r.val_agreement:.1%}"
    return text + (" (best)" if improved else "")
