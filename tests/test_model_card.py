"""A checkpoint's README.md is a Hugging Face model card: metadata the hub reads (base model,
datasets, model-index with this checkpoint's scores), and no path of the server it was trained on."""

from huggingface_hub import ModelCard

from worker.engine.checkpoints import model_card
from worker.engine.spec import parse_spec

SERVER = "/srv/distill/artifacts/datasets/ds-0123456789abcdef"  # what the engine gets for an upload


def spec(**overrides):
    return parse_spec(
        {
            "name": "my-distillation",
            "method": "minillm",
            "teacher": "hub:HuggingFaceTB/SmolLM2-1.7B-Instruct",
            "student": {"model": "/srv/models/smol-student"},
            "data": {
                "train": f"{SERVER}/train.jsonl",
                "eval": "builtin:demo-eval",
                "selection": f"{SERVER}/selection.jsonl",
            },
            "training": {"steps": 6},
            **overrides,
        }
    )


SCORES = {
    "teacher": {"rouge_l": 30.5, "reverse_kl": 0.0},
    "initial": {"rouge_l": 1.25, "reverse_kl": 9.5},
    "final": {"rouge_l": 12.557, "reverse_kl": 6.256, "distinct_4": 100.0},
}


def load(tmp_path, text: str) -> ModelCard:
    (tmp_path / "README.md").write_text(text)
    return ModelCard.load(tmp_path / "README.md")


def test_the_final_checkpoint_card_carries_its_test_and_selection_scores_as_model_index(tmp_path):
    text = model_card(spec(), 6, SCORES, {"rouge_l": 7.5}, (7.5, 6))
    card = load(tmp_path, text)
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("test", "rougeL"): 12.557,
        ("test", "reverse_kl"): 6.256,
        ("test", "distinct_4"): 100.0,
        ("selection", "rougeL"): 7.5,
    }
    assert {r.dataset_type for r in card.data.eval_results if r.dataset_split == "test"} == {"builtin:demo-eval"}
    assert card.data.model_name == "my-distillation (step 6)"
    # The student started from a local directory: no hub id to name as its base model.
    assert card.data.base_model is None and card.data.datasets == ["builtin:demo-eval"]
    assert "arxiv:2306.08543" in card.data.tags and "https://arxiv.org/abs/2306.08543" in text
    assert card.data.library_name == "transformers" and "AutoModelForCausalLM.from_pretrained" in text
    assert "/srv" not in text and "smol-student" in text and "train.jsonl" in text  # names, never server paths
    assert "| final | 100.000 | 6.256 | 12.557 |" in text


def test_an_earlier_checkpoint_claims_only_its_selection_scores_and_a_derived_student_names_the_teacher(tmp_path):
    derived = spec(
        student={"init_from_teacher": {"num_layers": 4}},
        teacher="builtin:smollm2-135m-instruct",
        method="sft",
        data={"train": "builtin:demo"},
    )
    card = load(
        tmp_path, model_card(derived, 3, {k: SCORES[k] for k in ("teacher", "initial")}, {"rouge_l": 4.0}, (4.0, 3))
    )
    assert [(r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("selection", "rougeL", 4.0)
    ]
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the builtin teacher was converted from
    assert card.data.datasets == ["builtin:demo", "builtin:demo-eval", "builtin:demo-selection"]
    assert not any(tag.startswith("arxiv:") for tag in card.data.tags)  # SFT is no one paper's method


def test_a_hub_student_is_the_base_model_and_a_card_without_scores_has_no_model_index(tmp_path):
    card = load(tmp_path, model_card(spec(student={"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}), 2, {}, None, None))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.eval_results is None
