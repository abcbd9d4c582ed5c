"""The quality study's bookkeeping: how it times a method, picks a rate, and what quality.json holds.
(The study itself trains for an hour and more; `bench/quality_study.py` runs it.)"""

import sys
from argparse import Namespace

import pytest

from worker.engine.paths import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "bench"))  # the study imports its sibling bench/report.py
import quality_study as study  # noqa: E402
import report  # noqa: E402


def event(type_, time, message="", **data):
    return {"type": type_, "message": message, "data": data, "time": time}


def test_seconds_per_step_counts_from_the_start_of_training_to_the_last_step():
    events = [
        event("state", 0.0, state="preparing"),
        event("log", 30.0, "SeqKD: the teacher samples responses"),
        event("log", 75.0, "training prompts"),
        event("state", 80.0, state="running"),
        event("metrics", 86.0),
        event("metrics", 90.0),
        event("metrics", 95.0),
        event("eval", 120.0, set="selection", scores={"rouge_l": 12.5}),
    ]
    assert study.seconds_per_step(events) == pytest.approx(5.0)  # (95 - 80) / 3: set-up and evaluation not counted
    assert study.one_off_seconds(events, "SeqKD: the teacher samples") == pytest.approx(45.0)
    assert study.selection_rouge(events) == 12.5


def test_learning_rates_from_the_command_line():
    lrs = study.parse_lrs(["minillm=1e-5,3e-5"])
    assert lrs["minillm"] == [1e-5, 3e-5] and lrs["sft"] == study.DEFAULT_LRS["sft"]
    with pytest.raises(SystemExit, match="METHOD=LR"):
        study.parse_lrs(["ppo=1e-5"])


def test_results_hold_each_arms_compute_and_per_seed_values():
    per_seed = {
        "10": {"rouge_l": 20.0, "response_length": 40.0, "distinct_4": 90.0},
        "20": {"rouge_l": 22.0, "response_length": 44.0, "distinct_4": 92.0},
    }
    means = {"rouge_l": 21.0, "response_length": 42.0, "distinct_4": 91.0}
    state = {
        "test": {
            "teacher": {"means": means, "per_seed": per_seed},
            "minillm": {
                "means": means | {"reverse_kl": 1.5, "forward_kl": 2.0, "reverse_kl_samples": 1.0},
                "per_seed": {seed: v | {"reverse_kl_samples": 1.0} for seed, v in per_seed.items()},
            },
        },
        "arms": {
            "minillm": {
                "method": "minillm",
                "learning_rate": 2e-5,
                "steps": 30,
                "seconds_per_step": 8.0,
                "compute_seconds": 240.0,
                "model": "/x",
                "sweep": {"2e-05": {"selection_rouge_l": 15.0, "model": "/x/2e-05"}},
            }
        },
        "test_prompts": 64,
        "machine": "cpu",
        "command": "cmd",
        "wall_seconds": 10.0,
        "shared_student": {"steps": 60},
        "calibration": {"minillm": {"seconds_per_step": 8.0}},
    }
    res = study.results(state, Namespace(budget_seconds=240, seeds=[10, 20]))
    arm = res["arms"]["minillm"]
    assert arm["compute_seconds"] == 240.0 and arm["learning_rate"] == 2e-5 and "model" not in arm
    assert arm["sweep"] == {"2e-05": {"selection_rouge_l": 15.0}}  # no server paths in the published figures
    assert arm["metrics"]["rouge_l"] == {"mean": 21.0, "per_seed": [20.0, 22.0]}
    assert arm["metrics"]["reverse_kl"] == {"mean": 1.5, "per_seed": None}  # teacher-forced: one value, no seeds
    assert res["arms"]["teacher"]["metrics"]["reverse_kl"]["mean"] is None
    table = study.markdown(res)
    assert arm["metrics"]["reverse_kl_samples"] == {"mean": 1.0, "per_seed": [1.0, 1.0]}
    assert "| minillm | minillm | 2e-05 | 30 | 240 | 21.00 ± 1.41 | 1.00 ± 0.00 | 1.50 |" in table
    assert "| minillm | 2e-05: 15.00 |" in table


def test_the_report_replaces_its_tables_and_keeps_the_prose_around_them():
    res = {"test_prompts": 4, "seeds": [10], "machine": "cpu", "command": "cmd", "wall_seconds": 60.0, "arms": {}}
    first = report.replace_block("# Quality\n\nWhy MiniLLM lost.\n", "quality_study.py", study.tables(res))
    again = report.replace_block(
        first.replace("Why", "Why, measured,"), "quality_study.py", study.tables(res | {"test_prompts": 8})
    )
    assert again.startswith("# Quality\n\nWhy, measured, MiniLLM lost.\n")
    assert (
        again.count("<!-- quality_study.py: begin -->") == 1
        and "8 test prompts" in again
        and "4 test prompts" not in again
    )
