"""teacher.deployments served through litellm's Router.

The deployments that serve one model form one Router model group (named after the model), so
litellm spreads requests over them (weighted by `rpm`/`tpm` where given), holds each to its
own `max_concurrency` (litellm's `max_parallel_requests`), and on a retryable failure re-picks
another deployment of the group before falling back (`enable_weighted_failover`). The groups
after the first are the first group's fallbacks, in the order the spec lists them.

Retries with backoff stay in the Teacher (teacher/client.py) so that one policy, with its
Retry-After handling and its halting errors, covers a single model and a router alike: the
Router is built with `num_retries=0` and each deployment's client with `max_retries=0`.

litellm refuses a request to a deployment whose `max_parallel_requests` slots are all in use
(a 429 of its own, sent nowhere) instead of waiting. Nothing was paid and nothing is wrong
with the deployment, so such a refusal waits for a request in flight to end and asks again,
without spending one of the Teacher's retries.

Which deployment answered is read back from the response (`_hidden_params["model_id"]`, the
id given to each deployment here), so the answer is cached under the model that deployment
serves: a fallback model's answer is kept apart from the first model's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .keys import api_key_for

SLOT_WAIT_S = 0.2  # the longest a refused request waits for a slot before asking again


class Deployments:
    def __init__(self, deployments, *, timeout_s: float, env):
        import litellm

        self.models: tuple[str, ...] = tuple(dict.fromkeys(d.served for d in deployments))
        self._serves = {str(i): d.served for i, d in enumerate(deployments)}
        model_list = [deployment_entry(str(i), d, api_key_for(
            d.api_key_env, d.api_base, d.model, env, field=f"teacher.deployments[{i}].api_key_env"))
            for i, d in enumerate(deployments)]
        first, *rest = self.models
        self._router = litellm.Router(
            model_list=model_list, num_retries=0, timeout=timeout_s,
            fallbacks=[{first: rest}] if rest else [], enable_weighted_failover=True)
        self._ended = asyncio.Condition()  # notified whenever a request in flight ends

    async def acompletion(self, **kwargs) -> Any:
        """Send one chat completion to the first model's group; litellm picks the deployment."""
        while True:
            try:
                response = await self._router.acompletion(model=self.models[0], **kwargs)
            except Exception as exc:
                if slots_full(exc):
                    await self._slot_freed()
                    continue
                await self._ended_one()
                raise
            await self._ended_one()
            return response

    async def _ended_one(self) -> None:
        async with self._ended:
            self._ended.notify_all()

    async def _slot_freed(self) -> None:
        async with self._ended:
            # Bounded: a request that ended between the refusal and this wait woke no one.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), SLOT_WAIT_S)

    def served_by(self, response) -> str:
        """The model whose deployment produced `response`."""
        deployment = (getattr(response, "_hidden_params", None) or {}).get("model_id")
        if deployment not in self._serves:
            # Every deployment carries an id set above; an answer without one is a litellm
            # change this module must follow, not something to cache under a guessed model.
            raise RuntimeError(f"litellm's Router answered from an unknown deployment {deployment!r}")
        return self._serves[deployment]


def slots_full(exc: Exception) -> bool:
    """Whether `exc` is litellm refusing a deployment whose concurrency slots are all taken."""
    from litellm.exceptions import RateLimitType

    return getattr(exc, "rate_limit_type", None) == RateLimitType.CONCURRENT_REQUESTS.value


def deployment_entry(deployment_id: str, deployment, api_key: str | None) -> dict:
    """One Router `model_list` entry: the group it belongs to, what litellm calls it with."""
    params: dict[str, Any] = {"model": deployment.model, "max_retries": 0}
    for name, value in (("api_base", deployment.api_base), ("api_key", api_key),
                        ("max_parallel_requests", deployment.max_concurrency),
                        ("rpm", deployment.rpm), ("tpm", deployment.tpm)):
        if value is not None:
            params[name] = value
    return {"model_name": deployment.served, "litellm_params": params,
            "model_info": {"id": deployment_id}}


__all__ = ["Deployments", "deployment_entry", "slots_full"]
