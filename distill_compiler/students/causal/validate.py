"""The score a causal student is selected on while it trains: its answers to a fixed set of
validation points, decoded greedily with the runtime's own constraint, against the teacher's.

Validation loss misleads here. On the support-agent example it was lowest at epoch 5 of 20
while tool choice kept improving: most assistant tokens are free-text replies, and the loss
rewards hedging between phrasings while a call is right or wrong as a whole. So the epoch that
ships is the one whose decoded answers agree best with the teacher's, as evaluate will measure
them: agreement per turn for an agent (same tool calls, or text where the teacher answered in
text), field F1 for an extraction.

Decoding goes through runtime.decoder.Decoder over the PyTorch model (TorchGraph has the ONNX
Graph's interface), so prompts, masks and stop tokens are the bundle's.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ...metrics.structured import field_scores, parse_json, turn_agrees
from ...runtime.decoder import Agent, Decoder, DecoderSpec, Extract
from .data import Point, points

VAL_POINTS = 32     # decoded every epoch: ~30 s for a 135M model on 2 CPU cores
ANSWER_MARGIN = 8   # tokens past the longest teacher answer before decoding gives up


class TorchGraph:
    """A PyTorch causal LM behind runtime.decoder.Graph's interface, batch 1."""

    def __init__(self, model):
        self.model = model

    def empty_cache(self):
        return None  # the model makes its own DynamicCache on the first step

    @torch.no_grad()
    def step(self, ids, start: int, cache):
        device = next(self.model.parameters()).device
        out = self.model(input_ids=torch.tensor([list(ids)], device=device),
                         position_ids=torch.arange(start, start + len(ids), device=device)[None],
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().cpu().numpy(), out.past_key_values


class StructuredValidation:
    """A fixed, evenly spread subset of the validation points and how to score a model on it."""

    def __init__(self, val: list[dict], spec, chat, tokenizer, end_id: int, limit: int = VAL_POINTS):
        every = [p for record in val for p in points(record, spec, chat)]
        stride = max(1, len(every) / limit) if every else 1
        self.points: list[Point] = [every[int(i * stride)] for i in range(min(limit, len(every)))]
        self.task, self.chat, self.tokenizer, self.end_id = spec.task, chat, tokenizer, end_id
        self.output_schema = spec.output.schema_ if spec.task == "extract" else None
        longest = max((len(tokenizer(chat.render([p.target]))["input_ids"]) for p in self.points),
                      default=0)
        self.max_new_tokens = longest + ANSWER_MARGIN
        self.metric = "field_f1" if spec.task == "extract" else "agreement"
        self.scores: dict[float, float] = {}  # epoch -> score, as SelectOnValidation measured
        self._decoder: Decoder | None = None

    def __bool__(self) -> bool:
        return bool(self.points)

    def decoder(self, model) -> Decoder:
        """Built once: classifying the vocabulary for the masks is the expensive part."""
        if self._decoder is None:
            config = model.config
            spec = DecoderSpec(
                input_ids="input_ids", position_ids="position_ids", attention_mask=None,
                logits="logits", past_inputs=[], past_outputs=[], num_kv_heads=0, head_dim=0,
                kv_dtype="float32", vocab_size=int(model.get_output_embeddings().weight.shape[0]),
                context_length=int(config.max_position_embeddings), stop_token_ids=[self.end_id])
            self._decoder = Decoder.over(TorchGraph(model), spec,
                                         self.tokenizer.backend_tokenizer, self.chat)
        self._decoder.graph.model = model
        return self._decoder

    def score(self, model) -> float:
        """Agreement (agent) or field F1 (extract) of the model's constrained answers."""
        decoder = self.decoder(model)
        messages = [decoder.complete(self.chat.render(p.prompt, add_generation_prompt=True),
                                     self.mode(p), self.max_new_tokens).message
                    for p in self.points]
        if self.task == "extract":
            answers = [parse_json(m.get("content")) for m in messages]
            targets = [parse_json(p.target["content"]) for p in self.points]
            return field_scores(answers, targets)["f1"] or 0.0
        return sum(turn_agrees(m, p.target) for m, p in zip(messages, self.points)) / len(messages)

    def mode(self, point: Point):
        return Extract(self.output_schema) if self.task == "extract" else Agent(point.tools)


class SelectOnValidation(TrainerCallback):
    """Adds the structured score to every evaluation's metrics, where Trainer's best-checkpoint
    choice and EarlyStoppingCallback (added after this callback) read it."""

    def __init__(self, validation: StructuredValidation, reporter):
        self.validation, self.reporter = validation, reporter

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if metrics is None or model is None:
            return
        training = model.training
        model.eval()
        try:
            value = self.validation.score(model)
        finally:
            model.train(training)
        metrics[f"eval_{self.validation.metric}"] = value
        self.validation.scores[state.epoch] = value
        self.reporter.log(f"fine-tuning: epoch {state.epoch:g}, validation "
                          f"{self.validation.metric.replace('_', ' ')} {value:.3f} "
                          f"on {len(self.validation.points)} points")
