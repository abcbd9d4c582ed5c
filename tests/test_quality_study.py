"""The quality study (bench/quality_study.py) end to end at its smoke size, and its arithmetic: the paired
bootstrap, the compute it charges, the data it reads. (The study itself runs for hours; this runs every
stage of it on tiny random models in about a minute.)"""

import json
import sys

import pytest

from worker.engine.paths import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the study imports its sibling bench modules
import quality_study as study  # noqa: E402

pytestmark = pytest.mark.slow


def write_sets(folder):
    """The paper's layout in miniature: Dolly's training and test files and the four other test sets (sinst with
    lists of references), each record carrying the rendered `prompt` MiniLLM's files have."""
    topics = ["a colour", "a fruit", "a planet", "a river", "a tree", "a bird", "a metal", "a song"]

    def records(n, offset, listed=False):
        for i in range(n):
            topic = topics[(i + offset) % len(topics)]
            answer = f"Here is {topic}: number {i + offset}."
            output = [answer, f"{topic} {i}"] if listed else answer
            yield {"instruction": f"Name {topic}.", "input": "", "output": output, "prompt": "ignored"}

    for path, n, offset, listed in [
        ("dolly/dev.jsonl", 30, 0, False),
        ("dolly/valid.jsonl", 6, 100, False),
        ("self-inst/valid.jsonl", 4, 200, False),
        ("vicuna/valid.jsonl", 4, 300, False),
        ("sinst/valid.jsonl", 4, 400, True),
        ("uinst/valid.jsonl", 4, 500, False),
    ]:
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text("".join(json.dumps(r) + "\n" for r in records(n, offset, listed)))


def test_the_study_runs_every_stage_reports_every_arm_on_every_set_and_reuses_only_identical_runs(tmp_path):
    write_sets(tmp_path / "data")
    argv = ["--data", str(tmp_path / "data"), "--preset", "smoke", "--out", str(tmp_path / "out")]
    argv += ["--docs", str(tmp_path / "docs"), "--precision", "fp32"]
    args = study.parse_args(argv)
    res = study.Study(args).run_all()
    study.write_report(res, args.docs)

    written = json.loads((tmp_path / "docs" / "quality.json").read_text())
    assert written == json.loads(json.dumps(res))
    assert set(written["arms"]) == set(study.MODELS)
    for name, arm in written["arms"].items():
        assert set(arm["sets"]) == set(study.SETS), name
        for set_name, scored in arm["sets"].items():
            seeds = args.dolly_seeds if set_name == "dolly" else args.other_seeds
            assert sorted(scored["rouge_l"]["per_seed"]) == sorted(str(s) for s in seeds)
            assert scored["rouge_l"]["mean"] == pytest.approx(sum(scored["rouge_l"]["per_seed"].values()) / len(seeds))
    assert written["study"]["sets"]["dolly"]["prompts"] == 3 and written["study"]["sets"]["vicuna"]["prompts"] == 2
    for set_name in study.SETS:
        assert set(written["comparisons"][set_name]) == set(study.MODELS) - {"minillm"}
        for c in written["comparisons"][set_name].values():
            assert c["ci95"][0] - 1e-9 <= c["minillm_minus_arm"] <= c["ci95"][1] + 1e-9
    # MiniLLM, GKD and their control, SFT continued, start from SFT's selected checkpoint with one recipe,
    # and are charged SFT's steps up to it.
    sft, minillm, control = written["arms"]["sft"], written["arms"]["minillm"], written["arms"]["sft-more"]
    assert minillm["start"] == f"sft@{sft['selection']['step']}" and written["arms"]["gkd"]["start"] == minillm["start"]
    assert control["method"] == "sft" and control["start"] == minillm["start"]
    assert (control["steps"], control["learning_rate"]) == (minillm["steps"], minillm["learning_rate"])
    assert control["compute"]["sft_steps"] == minillm["compute"]["sft_steps"]
    assert minillm["compute"]["sft_steps"] > 0 and minillm["compute_seconds"] > minillm["compute"]["steps"] > 0
    assert written["arms"]["seqkd"]["compute"]["teacher_samples"] > 0
    assert written["arms"]["gkd"]["gkd"] == {"beta": 1.0, "lmbda": 1.0}
    assert sft["selection"]["step"] in {int(s) for s in sft["selection"]["rouge_l_by_step"]}
    page = (tmp_path / "docs" / "quality.md").read_text()
    assert "| minillm | " in page and "| MiniLLM minus | dolly | self-inst | vicuna | sinst | uinst |" in page

    # Again with the same settings: nothing trains again; with more rollouts a phase, only MiniLLM does.
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    again = study.Study(study.parse_args(argv)).run_all()
    assert again["study"]["wall_seconds"] > res["study"]["wall_seconds"] > 0  # adds up over invocations
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == runs
    assert again["arms"]["minillm"]["sets"] == res["arms"]["minillm"]["sets"]
    study.Study(study.parse_args([*argv, "--rollouts-per-phase", "8"])).run_all()
    added = sorted(set(p.name for p in (tmp_path / "out" / "runs").iterdir()) - set(runs))
    assert len(added) == 1 and added[0].startswith("minillm-")


def test_paired_bootstrap_interval():
    ours, theirs = [3.0, 5.0, 4.0, 6.0], [1.0, 3.0, 2.0, 4.0]
    assert study.paired_bootstrap(ours, theirs) == (pytest.approx(2.0), pytest.approx(2.0))  # a constant gap
    low, high = study.paired_bootstrap([1.0, 0.0] * 50, [0.0] * 100)
    assert low < 0.5 < high and 0.35 < low and high < 0.65  # mean 0.5, standard error 0.05
    assert study.paired_bootstrap([1.0, 0.0] * 50, [0.0] * 100) == (low, high)  # seeded: the same every time


def test_compute_is_the_timed_sections_of_steps_and_one_offs():
    def metrics(step, **values):
        return {"type": "metrics", "data": {"step": step, "values": values}, "time": 0.0, "message": ""}

    events = [
        {"type": "log", "message": "SeqKD: the teacher samples responses", "data": {}, "time": 10.0},
        {"type": "log", "message": "next", "data": {}, "time": 55.0},
        metrics(1, loss=3.0, time_sample=2.0, time_backward=1.0, tokens_per_s=9.0),
        metrics(2, loss=2.0, time_sample=2.5, time_backward=1.5),
    ]
    assert study.step_seconds(events) == pytest.approx(7.0)
    assert study.step_seconds(events, up_to=1) == pytest.approx(3.0)
    assert study.one_off_seconds(events, "SeqKD: the teacher samples") == pytest.approx(45.0)
    assert study.one_off_seconds(events, "nothing like it") == 0.0


def test_test_sets_keep_every_reference_and_the_training_split_holds_the_selection_slice_out(tmp_path):
    write_sets(tmp_path / "data")
    (record, *_) = study.read_test_set(tmp_path / "data" / "sinst/valid.jsonl")
    assert record.references == ["Here is a colour: number 400.", "a colour 0"]
    assert record.record.response == record.references[0]
    args = study.parse_args(["--data", str(tmp_path / "data"), "--preset", "smoke"])
    train, selection = study.write_training_split(args, tmp_path / "split")
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    held = [json.loads(line) for line in selection.read_text().splitlines()]
    assert (len(rows), len(held)) == (args.train_records - args.selection_prompts, args.selection_prompts)
    assert set(rows[0]) == {"instruction", "input", "output"}  # the rendered `prompt` is left to the engine
    assert not {r["output"] for r in rows} & {r["output"] for r in held}


def test_the_committed_results_cover_every_model_and_set_at_the_issues_floors_and_agree_with_themselves():
    """docs/quality.json is the study's own output: every model on every set, MiniLLM minus each other model
    equal to the difference of their means (prompts paired, so the mean of differences is the difference of
    means), and the sizes at least the floors the study was sized to."""
    res = json.loads((PROJECT_ROOT / "docs" / "quality.json").read_text())
    assert set(res["arms"]) == set(study.MODELS)
    for name, arm in res["arms"].items():
        assert set(arm["sets"]) == set(study.SETS), name
    for set_name, about in res["study"]["sets"].items():
        floor = (200, 3) if set_name == "dolly" else (64, 2)
        assert (about["prompts"], len(about["seeds"])) >= floor, set_name
        ours = res["arms"]["minillm"]["sets"][set_name]["rouge_l"]["mean"]
        assert set(res["comparisons"][set_name]) == set(study.MODELS) - {"minillm"}
        for name, c in res["comparisons"][set_name].items():
            theirs = res["arms"][name]["sets"][set_name]["rouge_l"]["mean"]
            assert c["minillm_minus_arm"] == pytest.approx(ours - theirs, abs=1e-9), (set_name, name)
            assert c["ci95"][0] <= c["minillm_minus_arm"] <= c["ci95"][1]
    assert res["study"]["response_tokens"] >= 128 and res["arms"]["minillm"]["steps"] >= 150
