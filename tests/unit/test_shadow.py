"""Shadow traffic and the drift alarm of `distill serve`: the bag-of-words classify bundle of
test_runtime behind the server, its mirrored requests answered by the fake teacher of
teacher_server.py, which starts to disagree halfway through."""

from __future__ import annotations

import json
import time

import pytest
from teacher_server import FakeTeacher
from test_runtime import policy, write_bundle
from test_server import KEY_ENV, running

from distill_compiler.serve.shadow import ShadowConfig
from distill_compiler.spec.models import Spec
from distill_compiler.teacher.logs import LogReader

KEYWORDS = {"billing": ["charged", "invoice"], "technical_bug": ["crash"]}


@pytest.fixture
def teacher():
    with FakeTeacher(KEYWORDS) as fake:
        yield fake


def shadowed_bundle(root, teacher, validation: float = 0.95):
    taught = policy(teacher={"model": "openai/fake-teacher", "api_base": teacher.api_base,
                             "api_key_env": KEY_ENV})
    report = {"metrics": {"cascade": {"val_accepted_accuracy": validation}}}
    return write_bundle(root, taught, extra={"report.json": json.dumps(report)})


def pairs(metrics: dict) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("distill_shadow_pairs_total")))


def ask_and_wait(c, text: str) -> tuple[dict, dict, dict]:
    """One completion, then the metrics once its mirrored pair (if any) is counted."""
    before = pairs(c.metrics())
    status, headers, body = c.chat(text)
    assert status == 200
    deadline = time.monotonic() + 10
    while (m := c.metrics()) and pairs(m) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return headers, body, m


def test_drift_alarm_fires_escalates_and_recovers(tmp_path, teacher, capfd):
    bundle = shadowed_bundle(tmp_path / "bundle", teacher)
    log = tmp_path / "shadow.jsonl"
    config = ShadowConfig(rate=1.0, window=6, margin=0.1, action="escalate", workers=1)
    with running(bundle, shadow=config, shadow_log=log) as c:
        for _ in range(6):
            headers, _, m = ask_and_wait(c, "charged twice")
            assert headers["x-distill-route"] == "student"
        assert m['distill_shadow_agreements_total{route="student",key="billing"}'] == 6
        assert (m["distill_drift"], m["distill_shadow_agreement"]) == (0, 1.0)
        assert m["distill_validation_agreement"] == 0.95

        teacher.keywords = {"password_reset": ["charged"]}  # the teacher changes its mind
        headers, _, m = ask_and_wait(c, "charged twice")
        assert headers["x-distill-route"] == "student"  # the answer went out before the pair
        assert m["distill_drift"] == 1 and m["distill_shadow_agreement"] == pytest.approx(5 / 6)
        headers, body, _ = ask_and_wait(c, "charged twice")
        assert headers["x-distill-route"] == "teacher"
        assert body["distill"]["reason"] == "drift: live agreement 0.83 < validation 0.95 - 0.1"
        assert body["choices"][0]["message"]["content"] == "password_reset"

        teacher.keywords = KEYWORDS  # agreement recovers over the next window of pairs
        routes = [ask_and_wait(c, "charged twice")[0]["x-distill-route"] for _ in range(7)]
        assert routes == ["teacher"] * 6 + ["student"]
        assert c.metrics()["distill_drift"] == 0
    warnings = capfd.readouterr().err
    assert "warning: drifting: live agreement 0.83 over the last 6" in warnings
    assert "warning: recovered" in warnings
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 8  # the pairs mirrored in the background, as teacher.logs rows
    spec = Spec.model_validate({"name": "t", "task": "classify", "teacher": {"logs": [log.name]},
                                "intents": [{"name": n, "description": n} for n in
                                            ("billing", "password_reset", "technical_bug")]})
    replayed = LogReader(spec, tmp_path).replay((log.name,))
    assert [r["target"] for r in replayed] == ["billing"] * 6 + ["password_reset"] + ["billing"]


def test_mirroring_never_delays_answers_and_drops_when_the_queue_is_full(tmp_path):
    with FakeTeacher(KEYWORDS, latency=0.5) as slow:
        bundle = shadowed_bundle(tmp_path / "bundle", slow)
        config = ShadowConfig(rate=1.0, queue=1, workers=1)
        with running(bundle, shadow=config) as c:
            started = time.perf_counter()
            for _ in range(5):
                assert c.chat("charged twice")[1]["x-distill-route"] == "student"
            elapsed = time.perf_counter() - started
            m = c.metrics()
    assert elapsed < 0.5  # five answers in less than one teacher call
    assert m['distill_shadow_dropped_total{reason="queue_full"}'] >= 3


def test_mirrored_calls_spend_the_teacher_budget(tmp_path, teacher):
    bundle = shadowed_bundle(tmp_path / "bundle", teacher)
    with running(bundle, shadow=ShadowConfig(rate=1.0, workers=1), budget_usd=1e-9) as c:
        ask_and_wait(c, "charged twice")  # an unpriced teacher: this call spends the cap
        c.chat("charged twice")
        deadline = time.monotonic() + 10
        while not (m := c.metrics()).get('distill_shadow_dropped_total{reason="budget"}'):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert pairs(m) == 1 and m["distill_teacher_budget_refusals_total"] == 1
