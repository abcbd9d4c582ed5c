import json

import pytest

from worker.engine.paths import PROJECT_ROOT
from worker.engine.preflight import preflight
from worker.engine.spec import DEFAULT_LEARNING_RATES, MAX_STEPS, JobSpec, SpecError, load_spec, parse_spec

STUDENT = {"student": {"model": "builtin:tiny-student"}}


def test_defaults_follow_the_paper():
    spec = parse_spec(STUDENT)
    m = spec.minillm
    assert (m.teacher_mix_alpha, m.clip_range, m.ppo_epochs, m.rollouts_per_phase) == (0.2, 0.2, 4, 64)
    # L_PT: the paper's plain next-token loss on 512-token chunks of data.pretrain, weight 1; no corpus, no term
    assert (m.lm_data, m.lm_coef, m.kd_ratio, m.lm_chunk_tokens, spec.data.pretrain) == (
        "pretrain",
        1.0,
        0.0,
        512,
        None,
    )
    assert m.length_normalization and m.single_step
    assert spec.training.learning_rate == 5e-6 and spec.training.warmup_steps == 100
    assert spec.eval.no_repeat_ngram_size == 6 and spec.method == "minillm"
    # the evaluation protocol: 5 test seeds, and a separate selection set that picks the best checkpoint
    assert spec.eval.seeds == [10, 20, 30, 40, 50] and spec.eval.selection_seeds == [10]
    assert spec.data.eval is None and spec.data.selection is None


def test_a_spec_with_only_the_student_resamples_many_times():
    spec = parse_spec(STUDENT)
    assert spec.updates_per_phase == 64 // 8 * 4
    assert spec.training.steps // spec.updates_per_phase >= 10  # phases of fresh rollouts in a default job
    assert not [loc for loc, _ in preflight(spec) if loc == ("training", "steps")]


@pytest.mark.parametrize("steps,refused", [(32, True), (33, False)])
def test_a_minillm_spec_that_would_never_resample_is_refused(steps, refused):
    spec = parse_spec({**STUDENT, "training": {"steps": steps}})  # 64 rollouts / 8 × 4 epochs = 32 updates a phase
    problems = dict(preflight(spec))
    assert (("training", "steps") in problems) == refused
    if refused:
        assert (
            "never sample new rollouts" in problems[("training", "steps")]
            and "32 updates" in problems[("training", "steps")]
        )
    kd = parse_spec({**STUDENT, "method": "kd", "training": {"steps": steps}})
    assert ("training", "steps") not in dict(preflight(kd))


def test_every_field_has_help_text():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no help text"
            annotation = field.annotation
            for sub in getattr(annotation, "__args__", (annotation,)):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    walk(sub)

    walk(JobSpec)


@pytest.mark.parametrize(
    "data,field",
    [
        ({**STUDENT, "trainig": {}}, "trainig"),
        ({**STUDENT, "training": {"stpes": 3}}, "training.stpes"),
        ({**STUDENT, "method": "ppo"}, "method"),
        ({**STUDENT, "minillm": {"teacher_mix_alpha": 1.5}}, "minillm.teacher_mix_alpha"),
        ({"student": {}}, "student"),
        ({"student": {"model": "x", "init_from_teacher": {"num_layers": 2}}}, "student"),
        ({**STUDENT, "deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "offload_optimizer"),
        (
            {**STUDENT, "deepspeed": {"zero_stage": 3, "shard_teacher": True}},
            "deepspeed.shard_teacher needs resources.devices 2",
        ),
        ({**STUDENT, "eval": {"seeds": [10, 10]}}, "eval.seeds"),
        (
            {**STUDENT, "method": "kd", "data": {"pretrain": "builtin:teacher-text"}},
            "data.pretrain is used only by method minillm",
        ),
        (
            {**STUDENT, "data": {"pretrain": "c.txt"}, "minillm": {"lm_data": "train_responses"}},
            "data.pretrain is unused",
        ),
        ({**STUDENT, "data": {"pretrain": "c.txt"}, "minillm": {"lm_coef": 0}}, "data.pretrain is unused"),
        ({**STUDENT, "minillm": {"lm_data": "responses"}}, "minillm.lm_data"),
        ({**STUDENT, "data": {"selecton": "x.jsonl"}}, "data.selecton"),
    ],
)
def test_bad_specs_name_the_field(data, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(data)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_teacher_is_sharded_whatever_the_students_zero_stage(zero_stage):
    spec = parse_spec(
        {**STUDENT, "deepspeed": {"zero_stage": zero_stage, "shard_teacher": True}, "resources": {"devices": 2}}
    )
    assert spec.deepspeed.shard_teacher


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({**STUDENT, "training": {"steps": 7}}))
    assert load_spec(tmp_path / "a.json").training.steps == 7
    (tmp_path / "b.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "b.yaml")


def test_fingerprint_changes_with_the_spec():
    a, b = parse_spec(STUDENT), parse_spec({**STUDENT, "training": {"seed": 11}})
    assert a.fingerprint() == parse_spec(STUDENT).fingerprint() != b.fingerprint()


def test_a_spec_without_a_learning_rate_gets_its_methods_measured_default_written_in():
    for method, rate in DEFAULT_LEARNING_RATES.items():
        spec = parse_spec({**STUDENT, "method": method, "training": {"steps": 7}})
        assert (spec.training.learning_rate, spec.training.steps) == (rate, 7)
        assert (
            spec.model_dump()["training"]["learning_rate"] == rate
        )  # stored with the job: a later default never moves it
    assert parse_spec({**STUDENT, "method": "sft", "training": {"learning_rate": 0.25}}).training.learning_rate == 0.25
    assert parse_spec({**STUDENT, "method": "kd"}).training.learning_rate == DEFAULT_LEARNING_RATES["kd"]
    with pytest.raises(SpecError, match="training.learning_rate: Input should be greater than 0"):
        parse_spec({**STUDENT, "training": {"learning_rate": 0}})


def test_gkd_parameters_shape_only_a_gkd_jobs_fingerprint():
    gkd = {"beta": 1.0, "lmbda": 1.0, "seq_kd": True, "temperature": 1.0}
    assert parse_spec({**STUDENT, "gkd": gkd}).fingerprint() == parse_spec(STUDENT).fingerprint()
    as_gkd = {**STUDENT, "method": "gkd"}
    assert parse_spec({**as_gkd, "gkd": gkd}).fingerprint() != parse_spec(as_gkd).fingerprint()


def test_gkd_fields_are_bounded_and_named():
    for field, value in (("beta", 1.5), ("lmbda", -0.1), ("temperature", 0)):
        with pytest.raises(SpecError, match=f"gkd.{field}"):
            parse_spec({**STUDENT, "method": "gkd", "gkd": {field: value}})
    with pytest.raises(SpecError, match="gkd.lambda: Extra inputs"):
        parse_spec({**STUDENT, "method": "gkd", "gkd": {"lambda": 0.5}})


@pytest.mark.parametrize("name", ["tiny.yaml", "smollm2-minillm.yaml"])
def test_examples_are_valid(name):
    spec = load_spec(PROJECT_ROOT / "examples" / name)
    assert spec.method == "minillm"


def test_distill_train_refuses_what_the_api_would_refuse_naming_the_field(tmp_path):
    from typer.testing import CliRunner

    from app.cli import cli

    path = tmp_path / "spec.yaml"
    request = {**STUDENT, "teacher": "builtin:tiny-teacher", "training": {"steps": 4}, "data": {"eval": "nope.jsonl"}}
    path.write_text(json.dumps({**request, "notify": {"webhook_url": "https://ci.example.com/h"}}))
    result = CliRunner().invoke(cli, ["train", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "training.steps: MiniLLM would never sample new rollouts" in result.output
    assert "data.eval: nope.jsonl: no such file" in result.output
    # A request file works as it is: its service part is read and set aside, not refused as unknown.
    assert "notify.webhook_url is the service's; a run without it tells no one" in result.output
    assert not (tmp_path / "out" / "events.jsonl").exists()


@pytest.mark.parametrize("key", ["train", "selection", "eval", "pretrain"])
def test_preflight_checks_every_data_file(key):
    problems = dict(preflight(parse_spec({**STUDENT, "data": {key: "/nonexistent.jsonl"}})))
    assert "no such file" in problems[("data", key)]
    builtin = dict(preflight(parse_spec({**STUDENT, "data": {key: "builtin:nope"}})))
    assert "unknown builtin" in builtin[("data", key)]
    uploads = dict(preflight(parse_spec({**STUDENT, "data": {key: "dataset:ds-x"}}), upload=lambda _id: None))
    assert "no such uploaded dataset" in uploads[("data", key)]


def test_the_builtin_corpus_passes_preflight():
    assert not preflight(
        parse_spec(
            {
                **STUDENT,
                "teacher": "builtin:tiny-teacher",
                "student": {"model": "builtin:tiny-student"},
                "data": {"pretrain": "builtin:teacher-text"},
            }
        )
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ({"training": {"steps": 2**31}}, "training.steps"),
        ({"training": {"learning_rate": float("inf")}}, "training.learning_rate"),
        ({"minillm": {"clip_range": float("nan")}}, "minillm.clip_range"),
        ({"eval": {"seeds": [1, 2**40]}}, "eval.seeds"),
        ({"name": "a\x00b"}, "name"),
        # Numbers that fit but that no worker can use.
        ({"training": {"adam_betas": [5, -1]}}, "training.adam_betas"),
        ({"training": {"batch_size": 2**31 - 1}}, "training.batch_size"),
        ({"minillm": {"temperature": 1e-300}}, "minillm.temperature"),
        ({"training": {"steps": MAX_STEPS + 1}, "recovery": {"steps": 2**31 - 1}}, "training.steps"),
        ({"data": {"max_response_tokens": 10**9}}, "data.max_response_tokens"),
    ],
)
def test_numbers_that_do_not_fit_and_nul_characters_are_refused_naming_the_field(override, field):
    with pytest.raises(SpecError, match=rf"^{field}"):
        parse_spec({"student": {"model": "x"}, **override})
    assert (
        parse_spec({"student": {"model": "x"}, "training": {"steps": MAX_STEPS, "seed": -(2**31)}}).training.steps
        == MAX_STEPS
    )
