"""The training process's log: a line a person can read for each step and each event that says something."""

import io

from worker.engine.events import Event, LogLineReporter

T = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def test_a_line_per_step_with_its_stage_main_metrics_and_speed_and_one_per_message():
    out = io.StringIO()
    log = LogLineReporter(out)
    log.emit(Event("state", "training from step 0 of 40", time=T))
    log.emit(Event("progress", data={"step": 0, "total_steps": 40}, time=T))
    values = {"tokens_per_s": 912.4, "lr": 5e-6, "reverse_kl": 0.12043, "loss": 0.253149, "forward_s": 0.2}
    log.emit(Event("metrics", data={"step": 3, "stage": "minillm", "values": values}, time=T + 1))
    log.emit(Event("progress", data={"step": 3, "total_steps": 40}, time=T + 1))  # says nothing
    log.emit(Event("metrics", data={"step": 4, "stage": "sft", "values": {"loss": 2.0}}, time=T + 2))
    log.emit(Event("eval", "selection set at step 4: rouge_l 12.3", data={"scores": {}}, time=T + 3))
    log.emit(Event("log", "disk is filling up", "warning", time=T + 4))
    assert out.getvalue().splitlines() == [
        "2027-01-15 08:00:00 info    training from step 0 of 40",
        "2027-01-15 08:00:01 info    step 3/40 minillm: loss 0.2531, reverse_kl 0.1204, lr 5e-06, 912 tokens/s",
        "2027-01-15 08:00:02 info    step 4/40 sft: loss 2",
        "2027-01-15 08:00:03 info    selection set at step 4: rouge_l 12.3",
        "2027-01-15 08:00:04 warning disk is filling up",
    ]


def test_a_step_before_any_progress_event_has_no_total():
    out = io.StringIO()
    LogLineReporter(out).emit(Event("metrics", data={"step": 1, "stage": "kd", "values": {"loss": 1.5}}, time=T))
    assert out.getvalue() == "2027-01-15 08:00:00 info    step 1 kd: loss 1.5\n"
