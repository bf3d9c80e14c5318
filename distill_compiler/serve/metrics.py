"""What `GET /metrics` shows, in the Prometheus text format: requests by path and status,
completions by route, a latency histogram, in-flight completions, escalation log lines, what
the teacher has cost against its budget, and for a classify bundle with an out-of-scope detector
the live out-of-scope share it implies and the accepted accuracy at that share."""

from __future__ import annotations

import bisect
import time
from collections import Counter

from ..metrics import ood

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
        self.out_of_scope = None  # an OutOfScopeEstimate, for a classify bundle with a detector

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
        if self.out_of_scope is not None:
            out += self.out_of_scope.render(self.routes)
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


class OutOfScopeEstimate:
    """The out-of-scope share of live traffic, estimated from the share answered `out_of_scope`
    (r) and the detector's validated false rate α and recall R: π̂ = (r − α)/(R − α); and the
    accepted accuracy the cascade has at π̂ (metrics/ood.at_share). Without a validated recall
    (the logs held no out-of-scope queries) R is taken as 1, so π̂ is a lower bound, and the
    accuracy assumes every missed out-of-scope query is answered wrong."""

    def __init__(self, validation: dict):
        self.false_rate = float(validation["false_rate"])
        self.in_scope = validation["in_scope"]
        measured = validation.get("out_of_scope")
        self.recall_known = measured is not None and validation.get("recall") is not None
        self.recall = float(validation["recall"]) if self.recall_known else 1.0
        self.out_of_scope = measured if self.recall_known else ood.worst_case_out_of_scope()

    @classmethod
    def of(cls, policy_data: dict) -> OutOfScopeEstimate | None:
        validation = (policy_data.get("out_of_scope") or {}).get("validation") or {}
        if validation.get("false_rate") is None or not validation.get("in_scope"):
            return None
        return cls(validation)

    def estimate(self, routes: Counter) -> tuple[float | None, float | None, float | None]:
        """(r, π̂, accepted accuracy at π̂); all None before the first answer."""
        total = sum(routes.values())
        if not total:
            return None, None, None
        rate = routes.get("out_of_scope", 0) / total
        share = ood.estimated_share(rate, self.false_rate, self.recall)
        if share is None:
            return rate, None, None
        return rate, share, ood.at_share(self.in_scope, self.out_of_scope, share)["accepted_accuracy"]

    def render(self, routes: Counter) -> list[str]:
        rate, share, accuracy = self.estimate(routes)
        basis = "validated" if self.recall_known else "assumed_1"
        out = []
        gauges = (
            ("distill_out_of_scope_rate",
             "Share of answered completions routed out_of_scope (r).", rate, ""),
            ("distill_out_of_scope_false_rate",
             "The detector's false out-of-scope rate on in-scope validation queries (alpha).",
             self.false_rate, ""),
            ("distill_out_of_scope_recall",
             ("The detector's out-of-scope recall on validation (R; 1 when the logs held no "
              "out-of-scope queries)."), self.recall, f'{{recall="{basis}"}}'),
            ("distill_out_of_scope_share_estimate",
             ("Estimated out-of-scope share of live traffic, (r - alpha) / (R - alpha); a lower "
              "bound when recall is assumed."), share, f'{{recall="{basis}"}}'),
            ("distill_accepted_accuracy_estimate",
             "Accepted accuracy the cascade has at the estimated out-of-scope share.", accuracy,
             f'{{recall="{basis}"}}'))
        for name, help, value, labels in gauges:
            if value is None:
                continue
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name}{labels} {value:.6g}"]
        return out


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
