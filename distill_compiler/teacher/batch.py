"""teacher.batch: requests sent through the provider's OpenAI-style batch endpoint.

`BatchTeacher` is a `Teacher` (teacher/client.py: the per-request cache, one lock per request,
the budget, the halting errors) whose misses are not sent one by one but handed to a
`Batcher`. The generate stage asks as it always does; requests that arrive together (all the
generation prompts, then the labels of everything they returned) are gathered until none has
come for `GATHER_S`, written as one JSONL file and sent through litellm's batch support:
`acreate_file` (purpose "batch"), `acreate_batch`, `aretrieve_batch` every
`teacher.batch_poll_s` until the batch ends, then `afile_content` of its output and error files.

What a kill must not cost twice: the batch id and the request keys it holds are committed to
the teacher cache (`RequestCache.open_batch`) as soon as the provider accepts the batch, before
the first poll. A rerun asks the same requests (the prompts are deterministic); those held by
an open batch are not sent again: the open batch is polled instead. Every answered line is
committed to the per-request cache before the batch is closed in the store, so a rerun after
that pays nothing. (A kill in the instant between the provider accepting a batch and the
commit of its id would lose the id: the one window left.)

A line that comes back with an error, or not at all, is retried in a later batch like a
failed request (up to `teacher.max_retries` times; 429 and 5xx only, other errors stop the
build as they do without batches); a batch that fails or expires as a whole fails each of
its lines so. The answers cost the batch price: litellm's `batch_cost_calculator`, which uses
the cost map's `*_cost_per_token_batches` and half the regular price where the map has none.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from ..errors import StageError
from .client import Request, Teacher
from .keys import api_key_for

GATHER_S = 0.05  # a batch is sent once no request has joined it for this long
MAX_LINES = 50_000  # OpenAI's limit of requests in one batch
ENDED = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


class LineFailed(Exception):
    """A request of a batch that came back without an answer."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code
        # Read by the client's retry rule: a missing line or a failed batch is worth asking
        # again, as are 429 and 5xx; a 400 would fail the same way again.
        self.retryable = status_code is None or status_code >= 500 or status_code in (408, 429)


class BatchTeacher(Teacher):
    """With `teacher.deployments`, batches go to the first deployment's endpoint (the first
    model's answers, at the batch price); a request whose line still fails after
    `max_retries` batches goes through the router instead, at the live price, rather than
    stopping the build: the other deployments are the fallback."""

    def __init__(self, config, cache, *, env: dict[str, str] | None = None, log=None, **kw):
        super().__init__(config, cache, env=env, **kw)
        env = os.environ if env is None else env
        # Every miss waits in a batch at once: teacher.max_concurrency bounds requests in
        # flight to a live endpoint, not lines of a file.
        self._slots = asyncio.Semaphore(MAX_LINES)
        self.live_fallback = bool(config.deployments)
        self._batched: set[int] = set()  # ids of the responses that came from a batch line
        primary = config.deployments[0] if config.deployments else config
        field = "teacher.deployments[0].api_key_env" if config.deployments else "teacher.api_key_env"
        self.batcher = Batcher(
            primary.model, primary.api_base,
            api_key_for(primary.api_key_env, primary.api_base, primary.model, env, field=field),
            cache, poll_s=config.batch_poll_s, max_retries=config.max_retries,
            record=self._record, log=log or (lambda message: None))

    async def _send(self, request: Request):
        for attempt in range(self.max_retries + 1):
            try:
                response = await self.batcher.submit(self.key(request), request)
                self._batched.add(id(response))
                return response
            except LineFailed as exc:
                if self.live_fallback and attempt == self.max_retries and exc.retryable:
                    return await super()._send(request)
                self._halt_unless_retryable(exc, attempt)
            except StageError as exc:
                self.halted = self.halted or exc
                raise self.halted from None

    def served_by(self, response) -> str:
        """A batch line is the first model's answer; a live one the router's deployment's."""
        if id(response) in self._batched:
            self._batched.discard(id(response))
            return self.model
        return super().served_by(response)

    def _record(self, key: str, response) -> None:
        """Cache one answered line the moment its batch is read, before the batch is closed."""
        self.cache.put(key, self.model, self._reply(key, self.model, response).as_cached())


class Batcher:
    """Gathers requests into batches at one endpoint, sends them and hands back each answer."""

    def __init__(self, model: str, api_base: str | None, api_key: str | None, store, *,
                 poll_s: float, max_retries: int, record, log):
        self.model = model
        self.store, self.poll_s, self.max_retries = store, poll_s, max_retries
        self.record, self.log = record, log
        # The name the provider knows the model by: `openai/gpt-4o-mini` is `gpt-4o-mini`.
        self.body_model = model.split("/", 1)[1]
        self.endpoint = f"{model} at {api_base or 'the default endpoint'}"  # the store's key
        self._api: dict[str, Any] = {"custom_llm_provider": "openai"}
        if api_base:
            self._api["api_base"] = api_base
        if api_key:
            self._api["api_key"] = api_key
        self._pending: dict[str, tuple[Request, asyncio.Future]] = {}
        self._last_joined = 0.0
        self._gathering: asyncio.Task | None = None
        self._polls: dict[str, asyncio.Task] = {}  # batch id -> its outcomes, shared

    async def submit(self, key: str, request: Request):
        """The response to `request` (a litellm ModelResponse), once its batch has ended;
        LineFailed when its line came back without one."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[key] = (request, future)
        self._last_joined = loop.time()
        if self._gathering is None or self._gathering.done():
            self._gathering = asyncio.ensure_future(self._gather())
        return await future

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - self._last_joined < GATHER_S:
            await asyncio.sleep(GATHER_S)
        taken, self._pending = self._pending, {}
        asyncio.ensure_future(self._settle(taken))

    async def _settle(self, taken: dict[str, tuple[Request, asyncio.Future]]) -> None:
        """Answer every future of `taken`: from the open batches that already hold its
        request (a killed compile's), else from new batches."""
        try:
            groups = []
            for batch_id, keys in self.store.open_batches(self.endpoint).items():
                mine = {k: taken.pop(k) for k in keys if k in taken}
                if mine:
                    self.log(f"teacher batch {batch_id}: resuming ({len(mine)} requests)")
                    groups.append((batch_id, mine))
            rest = list(taken.items())
            for start in range(0, len(rest), MAX_LINES):
                chunk = dict(rest[start:start + MAX_LINES])
                groups.append((await self._create(chunk), chunk))
            await asyncio.gather(*(self._answer(batch_id, mine) for batch_id, mine in groups))
        except BaseException as exc:  # whatever ends this, the waiters must hear it
            for _, future in taken.values():
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    async def _answer(self, batch_id: str, mine: dict) -> None:
        if batch_id not in self._polls:
            self._polls[batch_id] = asyncio.ensure_future(self._outcomes(batch_id))
        try:
            outcomes = await asyncio.shield(self._polls[batch_id])
        except Exception as exc:  # noqa: BLE001 (handed to each waiter, which raises it)
            for _, future in mine.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for key, (_, future) in mine.items():
            outcome = outcomes.get(key)
            if outcome is None:
                future.set_exception(LineFailed(f"batch {batch_id} returned no line for it"))
            elif isinstance(outcome, LineFailed):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    async def _create(self, chunk: dict[str, tuple[Request, asyncio.Future]]) -> str:
        import litellm

        lines = "".join(json.dumps(self.line(key, request), sort_keys=True) + "\n"
                        for key, (request, _) in chunk.items())
        uploaded = await self._call(litellm.acreate_file, "upload the batch file",
                                    file=("requests.jsonl", lines.encode()), purpose="batch")
        batch = await self._call(litellm.acreate_batch, "create the batch",
                                 completion_window="24h", endpoint=CHAT,
                                 input_file_id=uploaded.id)
        # Committed before the first poll: from here on a kill resumes this batch.
        self.store.open_batch(batch.id, self.endpoint, list(chunk))
        self.log(f"teacher batch {batch.id}: {len(chunk)} requests sent; polling every "
                 f"{self.poll_s:g}s")
        return batch.id

    def line(self, key: str, request: Request) -> dict:
        """One request of the batch file; its custom_id is the request's cache key."""
        return {"custom_id": key, "method": "POST", "url": CHAT,
                "body": {"model": self.body_model, "messages": list(request.messages),
                         **request.params()}}

    async def _outcomes(self, batch_id: str) -> dict[str, Any]:
        """Poll `batch_id` until it ends; each line's response (committed to the cache) or
        LineFailed, by request key. The batch is closed in the store once all are cached."""
        import litellm

        while True:
            try:
                batch = await self._call(litellm.aretrieve_batch, f"poll batch {batch_id}",
                                         batch_id=batch_id)
            except StageError as exc:
                if isinstance(exc.__cause__, litellm.NotFoundError):
                    batch = None  # the provider no longer knows it: ask its requests again
                else:
                    raise
            if batch is None or batch.status in ENDED:
                break
            await asyncio.sleep(self.poll_s)
        outcomes: dict[str, Any] = {}
        if batch is not None and batch.status == "completed":
            outcomes.update(await self._lines(batch.error_file_id, batch_id))
            outcomes.update(await self._lines(batch.output_file_id, batch_id))
        else:
            self.log(f"teacher batch {batch_id}: {batch.status if batch else 'gone'}; "
                     "its requests go in the next batch")
        self.store.close_batch(batch_id)
        return outcomes

    async def _lines(self, file_id: str | None, batch_id: str) -> dict[str, Any]:
        import litellm

        if not file_id:
            return {}
        content = await self._call(litellm.afile_content, f"read batch {batch_id}'s results",
                                   file_id=file_id)
        out: dict[str, Any] = {}
        for text in content.content.decode().splitlines():
            if text.strip():
                row = json.loads(text)
                out[row["custom_id"]] = self.outcome(row)
                if not isinstance(out[row["custom_id"]], LineFailed):
                    self.record(row["custom_id"], out[row["custom_id"]])
        return out

    def outcome(self, row: dict):
        """A result line as a litellm ModelResponse priced at the batch price, or LineFailed."""
        import litellm
        from litellm.cost_calculator import batch_cost_calculator

        response = row.get("response") or {}
        status = response.get("status_code")
        if status != 200 or row.get("error"):
            error = row.get("error") or (response.get("body") or {}).get("error") or {}
            return LineFailed(f"batch line failed: {error.get('message', 'no answer')}", status)
        answer = litellm.ModelResponse(**response["body"])
        prompt_cost, completion_cost = batch_cost_calculator(answer.usage, model=self.model)
        answer._hidden_params = {"response_cost": prompt_cost + completion_cost}
        return answer

    async def _call(self, fn, what: str, **kwargs):
        """One call of litellm's batch API, retried on transient errors like a request."""
        from .client import Backoff, _retry_after, _retryable

        backoff = Backoff()
        for attempt in range(self.max_retries + 1):
            try:
                return await fn(**self._api, **kwargs)
            except Exception as exc:  # litellm maps provider errors onto its own classes
                if not _retryable(exc) or attempt == self.max_retries:
                    raise StageError(
                        "generate", f"could not {what} ({self.endpoint}): {exc}",
                        "open batches are kept in the teacher cache: rerun to resume polling "
                        "them, paying nothing twice") from exc
                await asyncio.sleep(backoff.delay(attempt, _retry_after(exc)))


__all__ = ["BatchTeacher", "Batcher", "LineFailed"]
