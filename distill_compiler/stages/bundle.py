"""Check the gates and assemble the edge bundle.

The bundle is what a service deploys: the shipped model, its tokenizer, the policy the runtime
applies, a report and a model card, and manifest.json, written last, with the sha256 of every
other file so runtime.load_bundle can refuse a bundle that changed after it was built.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from importlib import metadata

from ..errors import StageError
from ..runtime.format import (
    CARD_FILE,
    DECODER_FILES,
    DECODER_TASKS,
    HTML_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    POLICY_FILE,
    REPORT_FILE,
    TOKENIZER_FILE,
    bundle_files,
    manifest_dict,
    sha256_file,
)
from ..spec.models import keyed_values

VERSION = "2"
KIND = "bundle"
KEYED_ON = ("name", "task", "description", "input", "output", "intents", "tools", "scenarios",
            "refusals", "escalation", "teacher", "data", "student", "export", "gates")
INPUTS = ("generate", "curate", "train", "export", "evaluate")
RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy", "jsonschema")


@dataclass(frozen=True)
class Gate:
    name: str  # the gates.* field
    metric: str
    value: float | None
    limit: float
    higher_is_better: bool
    hint: str

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def describe(self) -> str:
        if self.value is None:
            return f"{self.metric} was not measured (no test examples), so {self.name} cannot pass"
        op = ("<" if self.higher_is_better else ">") if not self.passed else (
            ">=" if self.higher_is_better else "<=")
        return f"{self.metric} {self.value:.2f} {op} {self.name} {self.limit:.2f}"


def gates_for(gates, task: str, metrics: dict) -> list[Gate]:
    """The gates the spec sets that apply to this task, with the test figures they compare."""
    out = []
    if gates.min_teacher_agreement is not None:
        out.append(Gate("min_teacher_agreement", "agreement", metrics["test"]["agreement"],
                        gates.min_teacher_agreement, True,
                        "improve the student (more examples per intent, more epochs, a larger "
                        "student.base) or lower gates.min_teacher_agreement"))
    if gates.max_escalation_rate is not None:
        out.append(Gate("max_escalation_rate", "escalation_rate",
                        metrics["cascade"]["test"]["escalation_rate"], gates.max_escalation_rate,
                        False,
                        "lower escalation.target_accuracy, escalate fewer intents or triggers, "
                        "improve the student, or raise gates.max_escalation_rate"))
    # min_schema_validity applies to generated JSON (extract, agent); a classifier's output is
    # a label from a closed set and always valid.
    if gates.min_schema_validity is not None and task != "classify":
        out.append(Gate("min_schema_validity", "schema_validity",
                        metrics["test"].get("schema_validity"), gates.min_schema_validity, True,
                        "train longer or on more examples, or lower gates.min_schema_validity"))
    return out


def check_gates(gates: list[Gate]) -> None:
    failed = [g for g in gates if not g.passed]
    if failed:
        raise StageError("bundle", "gate failed: " + "; ".join(g.describe() for g in failed),
                         " / ".join(g.hint for g in failed))


def run(ctx) -> dict:
    spec = ctx.spec
    path = {name: artifact.path for name, artifact in ctx.inputs.items()}
    metrics = read_input(path, "evaluate", "metrics.json")
    gates = gates_for(spec.gates, spec.task, metrics)
    check_gates(gates)

    files = bundle_files(spec.task)
    shipped = (MODEL_FILE, TOKENIZER_FILE) + (DECODER_FILES if spec.task in DECODER_TASKS else ())
    for name in shipped:
        shutil.copyfile(path["export"] / name, ctx.out / name)
    # evaluate is policy.json's one writer; the bundle ships it as written.
    shutil.copyfile(path["evaluate"] / POLICY_FILE, ctx.out / POLICY_FILE)
    policy = read_input(path, "evaluate", POLICY_FILE)

    train_log = read_input(path, "train", "train_log.json")
    parity = read_input(path, "export", "parity.json")
    report = {
        "metrics": metrics,
        "gates": [{"gate": g.name, "metric": g.metric, "value": g.value, "limit": g.limit,
                   "higher_is_better": g.higher_is_better, "passed": g.passed} for g in gates],
        "curate": read_input(path, "curate", "report.json"),
        "train": train_log,
        "parity": parity,
        "generate": read_input(path, "generate", "stats.json"),
    }
    write_json(ctx.out / REPORT_FILE, report)

    from ..report import html, model_card  # only the bundle stage renders these
    (ctx.out / CARD_FILE).write_text(model_card.render(spec, policy, report), encoding="utf-8")
    (ctx.out / HTML_FILE).write_text(html.render(report, spec.name, spec.description),
                                     encoding="utf-8")

    manifest = manifest_dict(
        spec.name, spec.task, spec_sha256(keyed_values(spec, KEYED_ON)),
        {name: sha256_file(ctx.out / name) for name in files}, versions(train_log, parity),
        {name: artifact.digest for name, artifact in sorted(ctx.inputs.items())})
    write_json(ctx.out / MANIFEST_FILE, manifest)
    cascade = metrics["cascade"]["test"]
    return {"files": len(files) + 1, "model_bytes": (ctx.out / MODEL_FILE).stat().st_size,
            "agreement": metrics["test"]["agreement"],
            "escalation_rate": cascade["escalation_rate"],
            "gates": {g.name: g.passed for g in gates}}


def spec_sha256(values: dict) -> str:
    """sha256 of the canonical JSON of the spec sections the bundle is keyed on."""
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def versions(train_log: dict, parity: dict) -> dict:
    """Versions of what built and what runs the bundle; training-side ones as train/export saw them."""
    out = {"distill_compiler": package_version("distill-compiler")}
    out.update({name: package_version(name) for name in RUNTIME_PACKAGES})
    for source in (train_log, parity):
        out.update(source.get("versions") or {})
    return out


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_input(paths: dict, stage: str, name: str):
    try:
        return json.loads((paths[stage] / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError("bundle", f"the {stage} artifact has no {name}",
                         f"rebuild it: distill compile --force {stage}") from None


def write_json(path, value, sort_keys: bool = True) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=False),
                    encoding="utf-8")
