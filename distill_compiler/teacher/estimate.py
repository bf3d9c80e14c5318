"""What a stage's teacher requests will cost, counted before any of them is sent.

A stage that calls the teacher runs its own request-building code against a `DryTeacher`:
the same prompts, the same `Request`s and the same cache keys as the real `Teacher`, but
nothing leaves the machine. A request whose key is in the per-request cache is free (a
rerun costs $0); a request not in it is one to pay for, counted with:

- input tokens: its rendered messages (and tools) counted by `litellm.token_counter` for the
  model (litellm falls back to tiktoken's cl100k for a model it has no tokenizer for);
- output tokens: the mean completion tokens of the cached answers of the same kind
  (`Request.kind`) met in this count, when there are any; else the tokens of the stand-in
  answer the stage gives for that kind (an answer of typical length), never more than the
  request's `max_tokens`. Each kind says which (`KindCount.output_basis`);
- dollars: tokens times `input_cost_per_token` and `output_cost_per_token` from litellm's
  local cost map (`litellm.get_model_info`); with `teacher.batch`, the map's
  `*_cost_per_token_batches`, or half the regular price where it has none (the rule litellm's
  `batch_cost_calculator` prices batch answers by, so the estimate and the bill agree). A
  model missing from the map has an unknown price, never a guessed one.

The stand-in answer of a request not in the cache lets the stage go on to the requests that
depend on it (the labels of the inputs a generation request would return, the next turn of
an agent trace), so those are counted too. What depends on the teacher's actual choices is
counted along the stand-in's path: an agent turn that is not cached answers without a tool
call, so tool-call rounds the teacher would make are not in the estimate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .cache import FILENAME, RequestCache
from .client import AnswerKeys, Reply, Request

# litellm fetches its price map from the network at import time unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@dataclass(frozen=True)
class StandIn:
    """The answer a dry run gives a request that is not in the cache."""

    content: str | None = None
    tool_calls: list[dict] | None = None
    logprobs: list[dict] | None = None


@dataclass(frozen=True)
class Price:
    """US dollars per token, from litellm's cost map."""

    input_per_token: float
    output_per_token: float


@dataclass
class KindCount:
    """The requests of one kind: how many to send, how many cached, their estimated tokens."""

    kind: str
    requests: int = 0  # not in the cache: these are paid for
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    output_basis: str = ""  # how output_tokens was estimated, for the plan to say


@dataclass
class Estimate:
    model: str
    kinds: list[KindCount]
    price: Price | None  # None: the model is not in litellm's cost map
    batch: bool = False  # priced at the batch price (teacher.batch)

    @property
    def requests(self) -> int:
        return sum(k.requests for k in self.kinds)

    @property
    def cached(self) -> int:
        return sum(k.cached for k in self.kinds)

    @property
    def input_tokens(self) -> int:
        return sum(k.input_tokens for k in self.kinds)

    @property
    def output_tokens(self) -> int:
        return sum(k.output_tokens for k in self.kinds)

    @property
    def usd(self) -> float | None:
        """The estimated dollars; None when there is something to pay and no known price."""
        if self.requests == 0:
            return 0.0
        return None if self.price is None else cost_usd(self.input_tokens, self.output_tokens,
                                                        self.price)

    def describe(self) -> str:
        """One line: requests to send, cached, tokens and dollars."""
        return (f"{self.requests:,} teacher requests to send ({self.cached:,} cached), "
                f"~{self.input_tokens:,} input + ~{self.output_tokens:,} output tokens, "
                f"{describe_usd(self)}")


def describe_usd(estimate: Estimate) -> str:
    if estimate.usd is None:
        return f"unknown price ({estimate.model} is not in litellm's cost map)"
    return f"~${estimate.usd:.4f} ({estimate.model}{', batch price' if estimate.batch else ''})"


def cost_usd(input_tokens: int, output_tokens: int, price: Price) -> float:
    return input_tokens * price.input_per_token + output_tokens * price.output_per_token


def price_of(model: str, batch: bool = False) -> Price | None:
    """The model's per-token prices in litellm's local cost map (its batch prices when
    `batch`, see the module docstring); None when it has none."""
    import litellm

    try:
        info = litellm.get_model_info(model)
    except Exception:  # noqa: BLE001 (litellm raises its own error, or others, for an unmapped model)
        return None
    cost_in, cost_out = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if cost_in is None or cost_out is None:
        return None
    if batch:
        return Price(float(info.get("input_cost_per_token_batches") or cost_in / 2),
                     float(info.get("output_cost_per_token_batches") or cost_out / 2))
    return Price(float(cost_in), float(cost_out))


def input_tokens(model: str, request: Request) -> int:
    """The tokens of a request's rendered messages and tools, as the model counts them."""
    import litellm

    return litellm.token_counter(model=model, messages=list(request.messages),
                                 tools=request.tools or None)


def answer_tokens(model: str, answer: StandIn) -> int:
    import json

    import litellm

    text = (answer.content or "") + (json.dumps(answer.tool_calls) if answer.tool_calls else "")
    return litellm.token_counter(model=model, text=text) if text else 0


def open_cache(cache_root: Path) -> RequestCache | None:
    """The request cache under `cache_root` when there is one; a count creates none."""
    path = Path(cache_root) / FILENAME
    return RequestCache(path) if path.is_file() else None


@dataclass
class _Kind:
    count: KindCount
    cached_output: list[int] = field(default_factory=list)  # completion tokens of cached answers
    guesses: list[tuple[int, int | None]] = field(default_factory=list)  # (stand-in, max_tokens)


class DryTeacher:
    """Stands where `Teacher` stands (`complete`, `key`) and counts instead of sending.

    `keys` (client.AnswerKeys) finds an answer cached from any of the teacher's models, as the
    Teacher does; what is not cached is counted, tokens and price, for the model asked first
    (the fallbacks answer only when it fails). `priced_as` names the litellm strings to look
    that model's price up by, in order (a deployment's own string, e.g. `azure/my-gpt-4o`,
    when the model name is not in the cost map)."""

    def __init__(self, keys: AnswerKeys, cache: RequestCache | None,
                 stand_in: Callable[[Request], StandIn], priced_as: tuple[str, ...] = (),
                 batch: bool = False):
        self.keys, self.cache, self.stand_in, self.batch = keys, cache, stand_in, batch
        self.model = keys.models[0]
        self.priced_as = (self.model, *priced_as)
        self._kinds: dict[str, _Kind] = {}
        self._seen: dict[str, Reply] = {}  # requests already counted as sent, by key

    @classmethod
    def for_teacher(cls, config, cache: RequestCache | None,
                    stand_in: Callable[[Request], StandIn]) -> DryTeacher:
        first = AnswerKeys.of(config).models[0]
        own = tuple(d.model for d in config.deployments if d.served == first)
        return cls(AnswerKeys.of(config), cache, stand_in, own, batch=config.batch)

    def key(self, request: Request) -> str:
        return self.keys.key(request)

    async def complete(self, request: Request) -> Reply:
        key = self.key(request)
        kind = self._kinds.setdefault(request.kind, _Kind(KindCount(request.kind)))
        reply = self.keys.lookup(self.cache, request)
        if reply is not None or key in self._seen:
            # The real Teacher pays once for identical requests: the repeat is a cache hit.
            kind.count.cached += 1
            if reply is not None and reply.completion_tokens:
                kind.cached_output.append(reply.completion_tokens)
            return reply or self._seen[key]
        answer = self.stand_in(request)
        kind.count.requests += 1
        kind.count.input_tokens += input_tokens(self.model, request)
        kind.guesses.append((answer_tokens(self.model, answer), request.max_tokens))
        self._seen[key] = Reply(key=key, content=answer.content, tool_calls=answer.tool_calls,
                                logprobs=answer.logprobs, cost_usd=0.0, prompt_tokens=0,
                                completion_tokens=0)
        return self._seen[key]

    def estimate(self) -> Estimate:
        prices = (price_of(model, self.batch) for model in dict.fromkeys(self.priced_as))
        price = next(filter(None, prices), None)
        return Estimate(self.model, [output_estimate(k) for k in self._kinds.values()], price,
                        self.batch)


def output_estimate(kind: _Kind) -> KindCount:
    """A kind's count with its output tokens filled in (see the module docstring)."""
    count = kind.count
    if not kind.guesses:
        count.output_basis = "nothing to send"
    elif kind.cached_output:
        mean = sum(kind.cached_output) / len(kind.cached_output)
        count.output_tokens = round(mean * len(kind.guesses))
        count.output_basis = f"mean of {len(kind.cached_output)} cached answers"
    else:
        count.output_tokens = sum(min(guess, cap) if cap else guess for guess, cap in kind.guesses)
        count.output_basis = "typical answer, at most max_tokens"
    return count


def over_limit(estimate: Estimate, limit_usd: float) -> str | None:
    """Why a compile must ask before spending, or None when the estimate is within the limit."""
    if estimate.requests == 0:
        return None
    if estimate.usd is None:
        return (f"{estimate.requests:,} teacher requests to send at an {describe_usd(estimate)}, "
                f"and teacher.confirm_over_usd is ${limit_usd:g}: rerun with --yes or raise "
                "teacher.confirm_over_usd")
    if estimate.usd <= limit_usd:
        return None
    return (f"the teacher requests are estimated at ${estimate.usd:.4f} ({estimate.requests:,} "
            f"requests, ~{estimate.input_tokens:,} input + ~{estimate.output_tokens:,} output "
            f"tokens), over teacher.confirm_over_usd ${limit_usd:g}: rerun with --yes or raise "
            "teacher.confirm_over_usd")


__all__ = ["DryTeacher", "Estimate", "KindCount", "Price", "StandIn", "cost_usd", "open_cache",
           "over_limit", "price_of"]
