"""What `GET /metrics` shows, in the Prometheus text format: requests by path and status,
completions by route, a latency histogram, in-flight completions, escalation log lines, and what
the teacher has cost against its budget."""

from __future__ import annotations

import bisect
import time
from collections import Counter

CHAT_PATH = "/v1/chat/completions"
PATHS = (CHAT_PATH, "/v1/models", "/health", "/metrics")
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format."""

    def __init__(self):
        self.responses: Counter[tuple[str, int]] = Counter()
        self.routes: Counter[str] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter[str] = Counter()
        self.in_flight = 0
        self.escalation_lines = 0
        self.budget = None  # the teacher's Budget, set by the service
        self.shadow = None  # the Shadow, when --shadow-rate is set

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        self.responses[(path, status)] += 1
        counts = self.buckets.setdefault(path, [0] * (len(LATENCY_BUCKETS_S) + 1))
        counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.sums[path] += seconds

    def render(self) -> str:
        out = _counter("distill_http_requests_total", "HTTP requests by path and status.",
                       {f'path="{p}",status="{s}"': n for (p, s), n in sorted(self.responses.items())})
        errors = Counter()
        for (_, status), n in self.responses.items():
            if status >= 400:
                errors[status] += n
        out += _counter("distill_http_errors_total", "HTTP responses with status >= 400, by status.",
                        {f'status="{s}"': n for s, n in sorted(errors.items())})
        out += _counter("distill_completions_total", "Answered completions by route.",
                        {f'route="{r}"': n for r, n in sorted(self.routes.items())})
        out += self._histogram()
        out += ["# HELP distill_in_flight Completions being answered now.",
                "# TYPE distill_in_flight gauge", f"distill_in_flight {self.in_flight}"]
        out += _counter("distill_escalation_log_lines_total",
                        "Lines appended to the escalation log.", {"": self.escalation_lines})
        if self.budget is not None:
            out += self._budget()
        if self.shadow is not None:
            out += self.shadow.render()
        return "\n".join(out) + "\n"

    def _histogram(self) -> list[str]:
        out = ["# HELP distill_request_duration_seconds Request latency by path.",
               "# TYPE distill_request_duration_seconds histogram"]
        for path, counts in sorted(self.buckets.items()):
            running = 0
            for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), counts):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'distill_request_duration_seconds_bucket{{path="{path}",le="{le}"}} '
                           f"{running}")
            out.append(f'distill_request_duration_seconds_sum{{path="{path}"}} {self.sums[path]:.6f}')
            out.append(f'distill_request_duration_seconds_count{{path="{path}"}} {running}')
        return out

    def _budget(self) -> list[str]:
        budget = self.budget
        out = ["# HELP distill_teacher_spend_usd What teacher calls have cost in this process.",
               "# TYPE distill_teacher_spend_usd gauge",
               f"distill_teacher_spend_usd {budget.spent_usd:.9g}"]
        if budget.limit_usd is not None:
            out += ["# HELP distill_teacher_budget_usd The cap on teacher spend "
                    "(--teacher-budget-usd).", "# TYPE distill_teacher_budget_usd gauge",
                    f"distill_teacher_budget_usd {budget.limit_usd:g}"]
        return out + _counter("distill_teacher_budget_refusals_total",
                              "Escalations answered by the student because the budget was spent.",
                              {"": budget.refused})


def _counter(name: str, help: str, values: dict[str, float]) -> list[str]:
    out = [f"# HELP {name} {help}", f"# TYPE {name} counter"]
    return out + [f"{name}{{{labels}}} {n}" if labels else f"{name} {n}"
                  for labels, n in values.items()]


class Observed:
    """ASGI middleware: times every HTTP request and counts it by path and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - started)
