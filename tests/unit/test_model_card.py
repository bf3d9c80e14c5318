"""MODEL_CARD.md of extract and agent bundles: every section, the figures report.json holds, and
nothing of a classifier's card (labels, calibration)."""

from __future__ import annotations

import pytest
from causal_reports import build

from distill_compiler.report import model_card

SECTIONS = ("## Intended use", "## Data", "## Model", "## Metrics", "## Cascade", "## Speed",
            "## Limitations")


@pytest.fixture(scope="module")
def agent():
    return build("agent")


@pytest.fixture(scope="module")
def extract():
    return build("extract")


def test_agent_card_shows_tools_calls_depth_and_speed(agent):
    card = model_card.render(*agent)
    for heading in (*SECTIONS, "## Tools"):
        assert heading in card, heading
    assert "## Labels" not in card and "Calibration" not in card
    assert "The tool-calling loop belongs to the host" in card
    assert "`get_order`, `cancel_order`" in card and "route `refusal`" in card
    # Conversation 2's missed lookup and conversation 1's wrong reason, per tool.
    assert ("| `get_order` | Look up an order by id. | `order_id` | 3 | 66.7% | 66.7% | 0.800 |"
            in card)
    assert ("| `cancel_order` | Cancel an order. | `order_id`, `reason` | 3 | 100.0% | 66.7% |"
            in card)
    for figure in ("Agreement with the teacher: 75.0%",
                   "6 tool calls: 100.0% constrained, 66.7% with plain greedy decoding",
                   "missed calls 1, spurious calls 1",
                   "tool-name accuracy 83.3%, call exact match 66.7%",
                   "| 0 | 6 | 66.7% | 66.7% | 0.824 | n/a |",
                   "| 1 | 6 | 83.3% | n/a | 0.000 | 0.833 |",
                   "16.7% escalated (low_confidence: 2)",
                   "Teacher calls: 167 per 1,000 requests",
                   "| constrained (ships) | 200 | 60.0 | 60.0 | 12.0 |",
                   "| unconstrained | 300 | 50.0 | 50.0 | 15.0 |",
                   "140,352 parameters; all weights trained",
                   "training loss 3.900 → 0.350",
                   "on 83.3% of 6 validation prompts (fp32 graph: 100.0%)",
                   "Measured up to depth 1"):
        assert figure in card, figure


def test_extract_card_shows_fields_and_what_the_constraint_buys(extract):
    card = model_card.render(*extract)
    for heading in (*SECTIONS, "## Output fields"):
        assert heading in card, heading
    assert "## Tools" not in card and "depth" not in card
    assert ("Extracts one JSON object (`order_id`, `issue`, `refund`) from the `message` field"
            in card)
    # Answer 7's issue and answer 3's refund are wrong; the pipe in a description stays in its cell.
    assert ('| `issue` | one of "late", "damaged", "other" | yes | What went wrong \\| in a word. '
            '| 10 | 0.900 | 0.900 | 0.900 |') in card
    assert "| `order_id` | string | yes |  | 10 | 1.000 | 1.000 | 1.000 |" in card
    for figure in ("Agreement with the teacher: 80.0%",
                   "Schema validity: 100.0% constrained, 90.0% with plain greedy decoding",
                   "precision 0.933, recall 0.933, F1 0.933",
                   "accuracy against gold was not measured",
                   "20.0% escalated (low_confidence: 2)",
                   "Weakest fields on test (F1): `issue` (0.900), `refund` (0.900)"):
        assert figure in card, figure


def test_a_sparse_train_log_and_lora_render(agent):
    spec, policy, report = agent
    report = {**report, "train": {"method": "sft", "base": "gemma-3-270m",
                                  "lora": {"r": 8, "alpha": 16,
                                           "target_modules": ["q_proj", "v_proj"]}},
              "parity": {}}
    card = model_card.render(spec, policy, report)
    assert "`gemma-3-270m`, method `sft`, n/a parameters" in card
    assert "LoRA r=8, alpha 16 on q_proj, v_proj, merged before export" in card
    assert "equal the trained model's on n/a of n/a validation prompts" in card


def test_nested_and_array_fields_find_their_schema():
    schema = {"type": "object", "properties": {
        "slots": {"type": "array", "items": {"type": "object"}},
        "who": {"type": "object", "properties": {"age": {"type": ["integer", "null"]}}}}}
    assert model_card.type_text(model_card.schema_at(schema, "slots[]")) == "object"
    assert model_card.type_text(model_card.schema_at(schema, "who.age")) == "integer or null"
    assert model_card.type_text(model_card.schema_at(schema, "nowhere.else")) == "any"
    assert model_card.within("who.age", "who") and not model_card.within("whom", "who")


def test_the_classify_card_names_the_int8_variant():
    from types import SimpleNamespace

    from distill_compiler.report.model_card import training_section

    spec = SimpleNamespace(student=SimpleNamespace(base="minilm-l6", method="kd"),
                           export=SimpleNamespace(quantize="int8"))
    parity = {"quantize": "int8", "agreement_shipped": 0.995, "sizes": {"model.onnx": 23_000_000},
              "int8": {"mode": "static", "variant": "static-percentile+fp32x2",
                       "latency_p50_ms": 3.0,
                       "tried": [{"variant": "static-minmax", "agreement": 0.98},
                                 {"variant": "static-percentile+fp32x2", "agreement": 0.995}]}}
    text = training_section(spec, {"train": {}, "parity": parity})
    assert ("quantization `int8`, variant static-percentile+fp32x2 (int8_mode static; batch-1 p50 "
            "3.00 ms at export; tried static-minmax 98.0%, static-percentile+fp32x2 99.5%), "
            "23.0 MB; argmax agreement with the trained model 99.5%.") in text


def test_the_classify_card_says_how_deep_the_shipped_encoder_is():
    from types import SimpleNamespace

    from distill_compiler.report.model_card import training_section

    spec = SimpleNamespace(student=SimpleNamespace(base="minilm-l6", method="kd"),
                           export=SimpleNamespace(quantize="int8"))
    parity = {"quantize": "int8", "agreement_shipped": 0.995}
    cut = training_section(spec, {"train": {"layers": "3 of 6", "val_agreement": 0.93,
                                            "full_depth_val_agreement": 0.94}, "parity": parity})
    assert ("- Layers: 3 of 6, cut from the fine-tuned full-depth model and distilled from its "
            "soft labels; the full-depth model's validation agreement was 94.0%.\n") in cut
    assert "Layers" not in training_section(spec, {"train": {}, "parity": parity})


def test_out_of_scope_recall_is_given_per_probe_cohort_when_there_are_several():
    from distill_compiler.report.figures import recall_by_cohort

    both = {"recall_by_cohort": {"out_of_scope_far": 0.95, "out_of_scope_near": 0.4}}
    assert recall_by_cohort(both) == " (far probes 95.0%, near-domain probes 40.0%)"
    assert recall_by_cohort({"recall_by_cohort": {"log": 0.5}}) == ""
    assert recall_by_cohort({}) == ""


def test_the_data_section_lists_the_confusable_pairs_named_and_found():
    from distill_compiler.report.model_card import data_section

    pairs = [{"pair": ["billing", "refund"], "source": "named", "examples": 40},
             {"pair": ["delivery", "refund"], "source": "found", "cosine": 0.8123, "examples": 38}]
    text = data_section({"generate": {"confusable_pairs": pairs}, "curate": {}})
    assert ("- Hard negatives per confusable pair: `billing` ~ `refund` (named): 40; "
            "`delivery` ~ `refund` (found, cosine 0.812): 38.") in text
    assert "confusable" not in data_section({"generate": {}, "curate": {}})
