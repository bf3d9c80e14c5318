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

from .. import spec as spec_mod
from ..artifacts import file_sha256
from ..errors import StageError

VERSION = "2"
KIND = "bundle"
KEYED_ON = ("name", "task", "description", "input", "output", "intents", "tools", "scenarios",
            "refusals", "escalation", "teacher", "data", "student", "export", "gates")
INPUTS = ("generate", "curate", "train", "export", "evaluate")
MANIFEST_FORMAT = 1
FILES = ("model.onnx", "tokenizer.json", "policy.json", "report.json", "MODEL_CARD.md",
         "report.html")
# What a decoder bundle adds: the chat format its prompts use and how to drive the KV-cache graph.
DECODER_FILES = ("chat.json", "decoder.json")
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
    copied = ("model.onnx", "tokenizer.json") + (DECODER_FILES if spec.task != "classify" else ())
    for name in copied:
        shutil.copyfile(path["export"] / name, ctx.out / name)
    policy = read_input(path, "evaluate", "policy.json")
    # Where escalations go; the key stays in the environment variable it names.
    policy["teacher"] = {"model": spec.teacher.model, "api_base": spec.teacher.api_base,
                         "api_key_env": spec.teacher.api_key_env}
    # Key order kept: output and tool schemas list properties in the order the student emits.
    write_json(ctx.out / "policy.json", policy, sort_keys=False)

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
    write_json(ctx.out / "report.json", report)

    from .. import model_card, report_html  # only the bundle stage renders these
    (ctx.out / "MODEL_CARD.md").write_text(model_card.render(spec, policy, report),
                                           encoding="utf-8")
    (ctx.out / "report.html").write_text(report_html.render(report, spec.name, spec.description),
                                         encoding="utf-8")

    manifest = {
        "format": MANIFEST_FORMAT,
        "name": spec.name,
        "task": spec.task,
        "spec_sha256": spec_sha256(spec, KEYED_ON),
        "files": {name: file_sha256(ctx.out / name) for name in files},
        "versions": versions(train_log, parity),
        "created_from": {name: artifact.digest for name, artifact in sorted(ctx.inputs.items())},
    }
    write_json(ctx.out / "manifest.json", manifest)
    cascade = metrics["cascade"]["test"]
    return {"files": len(files) + 1, "model_bytes": (ctx.out / "model.onnx").stat().st_size,
            "agreement": metrics["test"]["agreement"],
            "escalation_rate": cascade["escalation_rate"],
            "gates": {g.name: g.passed for g in gates}}


def bundle_files(task: str) -> tuple[str, ...]:
    """Every file the manifest lists for a bundle of this task."""
    return FILES if task == "classify" else FILES + DECODER_FILES


def spec_sha256(spec, sections: tuple[str, ...]) -> str:
    """sha256 of the canonical JSON of the spec sections, minus fields that never change output."""
    from pydantic_core import to_jsonable_python

    values = {}
    for section in sections:
        value = to_jsonable_python(getattr(spec, section), by_alias=True)
        if isinstance(value, dict) and section in spec_mod.NOT_KEYED:
            value = {k: v for k, v in value.items() if k not in spec_mod.NOT_KEYED[section]}
        values[section] = value
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
