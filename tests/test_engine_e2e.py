"""Every method end to end on tiny random models through DeepSpeed, checkpoints, resume, 2 processes."""

import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
import yaml
from helpers import read_events, tiny_spec
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.engine import checkpoints as ckpt
from worker.engine import trainer as trainer_module
from worker.engine.data import read_records
from worker.engine.events import Event, JsonlReporter
from worker.engine.paths import cache_dir
from worker.engine.spec import parse_spec
from worker.engine.trainer import Cancelled, train

pytestmark = pytest.mark.slow


class CancelAfter(JsonlReporter):
    """Writes events like the CLI does and asks to stop once `step` is reached."""

    def __init__(self, path, step):
        super().__init__(path)
        self.step, self.seen = step, 0

    def emit(self, event: Event) -> None:
        super().emit(event)
        if event.type == "progress":
            self.seen = event.data["step"]

    def should_cancel(self) -> bool:
        return self.seen >= self.step


def run(tmp_path, spec_dict, name="run"):
    out = tmp_path / name
    scores = train(parse_spec(spec_dict), out, JsonlReporter(out / "events.jsonl"))
    return out, scores


def metrics_by_step(out):
    return {e["data"]["step"]: e["data"]["values"] for e in read_events(out) if e["type"] == "metrics"}


def assert_loads_and_generates(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("Name a colour.", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("sft", {}),
        ("kd", {}),
        ("seqkd", {}),
        ("minillm", {"recovery": {"method": "kd", "steps": 2, "learning_rate": 2e-3}}),
    ],
)
def test_method_runs_end_to_end(tmp_path, dataset, method, extra):
    spec = tiny_spec(dataset, method=method, **extra)
    out, scores = run(tmp_path, spec)
    events = read_events(out)
    assert events[-1]["type"] == "state" and events[-1]["data"]["state"] == "succeeded"
    total = 6 + (2 if extra else 0)
    metrics = metrics_by_step(out)
    assert sorted(metrics) == list(range(1, total + 1))
    assert all(math.isfinite(v) for m in metrics.values() for v in m.values())
    stages = {e["data"]["stage"] for e in events if e["type"] == "metrics"}
    assert stages == ({"recovery-kd", "minillm"} if extra else {method})
    if method == "minillm":  # no data.pretrain: the job says the LM term is off, and it is
        assert any(e["message"].startswith("minillm: LM term off (no data.pretrain") for e in events)
        assert all(metrics[s]["lm_loss"] == 0 for s in range(3, total + 1))
    if extra:  # recovery: cosine from 2e-3 over 2 steps; then the main stage's constant 1e-3
        assert [metrics[s]["lr"] for s in (1, 2, 3, 8)] == pytest.approx([2e-3, 1e-3, 1e-3, 1e-3])
    # The test set scores the teacher and the initial student first, the final model and the best
    # checkpoint last; the selection set is scored every 3 steps and at the end.
    evals = [e["data"] for e in events if e["type"] == "eval"]
    tests = [(e["label"], e["step"]) for e in evals if e["set"] == "test"]
    best = ckpt.best_step(out)
    assert tests == [("teacher", 0), ("initial", 0), ("final", total), ("best", best)]
    assert [e["step"] for e in evals if e["set"] == "selection"] == [0, 3, 6] + ([total] if total > 6 else [])
    seeds = sorted(str(seed) for seed in parse_spec(spec).eval.seeds)
    assert all(sorted(e["per_seed"]) == seeds for e in evals if e["set"] == "test")
    # Every evaluation keeps the samples of its set's first 3 prompts (eval.samples): the same prompts and
    # references for the teacher, the initial student and every step.
    for kept_set in ("test", "selection"):
        kept = [[(s["prompt"], s["reference"]) for s in e["samples"]] for e in evals if e["set"] == kept_set]
        assert len(kept[0]) == 3 and all(k == kept[0] for k in kept), kept_set
        assert all(isinstance(s["response"], str) for e in evals for s in e["samples"])
    test_prompts = [s["prompt"] for s in evals[0]["samples"]]
    assert test_prompts == [r.message for r in read_records(spec["data"]["eval"])[:3]]
    assert list(scores) == ["teacher", "initial", "final", "best"]
    assert set(scores["final"]) == {"rouge_l", "response_length", "distinct_4", "reverse_kl", "forward_kl"}
    final = out / "checkpoints" / f"step-{total:06d}"
    card = (final / "README.md").read_text()
    assert method in card and "builtin:tiny-teacher" in card and "rouge_l" in card and "| best |" in card
    assert_loads_and_generates(final)


def test_best_checkpoint_is_chosen_on_the_selection_set_and_scored_on_the_test_set(tmp_path, dataset, monkeypatch):
    """Selection Rouge-L 5, 9, 7 at steps 0, 3, 6: the checkpoint of step 3 is the best, not the final one."""
    selection_rouge, tested = iter([5.0, 9.0, 7.0]), []

    def scripted_evaluate(model, teacher, examples, tokenizer, spec, vocab_size, device, seeds, check=None):
        if seeds == spec.eval.selection_seeds:
            return {"rouge_l": next(selection_rouge)}, {}, []
        tested.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"rouge_l": 1.0}, {}, []

    monkeypatch.setattr(trainer_module, "evaluate", scripted_evaluate)
    monkeypatch.setattr(
        trainer_module.Trainer, "teacher_scores", lambda self: ({"rouge_l": 1.0}, {}, [])
    )  # never cached
    out, scores = run(tmp_path, tiny_spec(dataset, method="sft", checkpoints={"every_steps": 3, "keep": 1}))
    events = read_events(out)
    assert ckpt.best_step(out) == 3 and events[-1]["data"]["best_step"] == 3
    saved = [e["data"] for e in events if e["type"] == "checkpoint"]
    assert [(c["step"], c["best"], c["scores"]) for c in saved] == [
        (3, True, {"rouge_l": 9.0}),
        (6, False, {"rouge_l": 7.0}),
    ]
    assert [(e["data"]["label"], e["data"]["step"]) for e in events if e["type"] == "eval"][-2:] == [
        ("final", 6),
        ("best", 3),
    ]
    # The test set scored the best checkpoint's own weights, read back from its directory (kept though keep is 1).
    best = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000003").state_dict()
    assert all(torch.equal(tested[-1][k], best[k]) for k in best)
    assert not all(torch.equal(tested[-2][k], best[k]) for k in best)  # the final model differs
    assert "the best so far is step 3" in (out / "checkpoints" / "step-000006" / "README.md").read_text()


@pytest.mark.parametrize("source", ["jsonl", "builtin:teacher-text"])
def test_minillm_lm_term_trains_on_data_pretrain(tmp_path, dataset, source):
    if source == "jsonl":
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text(
            "".join(
                json.dumps({"text": f"Note {i}: the kettle is on and the tea will be ready soon."}) + "\n"
                for i in range(12)
            )
        )
        source = str(corpus)
    spec = tiny_spec(
        dataset,
        data={"pretrain": source, "teacher_text_documents": 6},
        minillm={"lm_chunk_tokens": 16},
        training={"steps": 5},
        eval={"every_steps": 0},
        checkpoints={"every_steps": 0},
    )
    out, _ = run(tmp_path, spec)
    events = read_events(out)
    said = [e["message"] for e in events if e["message"].startswith("minillm: LM term")]
    assert len(said) == 1 and re.fullmatch(
        rf"minillm: LM term: next-token loss on data\.pretrain \({re.escape(source)}: \d+ chunks of 16 tokens\), "
        r"weight minillm\.lm_coef 1; teacher logits kept for each phase \(\d+\.\d\d GB per process\)",
        said[0],
    ), said
    assert events.index(next(e for e in events if e["message"] == said[0])) < events.index(
        next(e for e in events if e["type"] == "metrics")
    )  # said at the start
    assert all(m["lm_loss"] > 0 for m in metrics_by_step(out).values())


def test_minillm_changes_the_student_towards_the_teacher(tmp_path, dataset):
    """A few MiniLLM steps at a high learning rate lower the reverse KL on held-out responses."""
    spec = tiny_spec(
        dataset, training={"steps": 8, "learning_rate": 3e-3}, eval={"every_steps": 0}, checkpoints={"every_steps": 0}
    )
    _, scores = run(tmp_path, spec)
    assert scores["final"]["reverse_kl"] < scores["initial"]["reverse_kl"]


def test_resume_mid_phase_equals_uninterrupted_run(tmp_path, dataset, monkeypatch):
    # 4 rollouts, micro-batch 2, 2 PPO epochs: a phase is 4 steps; checkpoint at 2 is mid-phase.
    spec = tiny_spec(dataset, training={"steps": 8}, checkpoints={"every_steps": 2, "keep": 1}, eval={"every_steps": 4})
    straight, straight_scores = run(tmp_path, spec, "straight")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(Cancelled):
        train(parse_spec(spec), interrupted, CancelAfter(interrupted / "events.jsonl", step=3))
    assert (interrupted / "resume" / "step-000002" / "trainer_state.json").exists()
    read, load_state_file = [], ckpt.load_state_file
    monkeypatch.setattr(ckpt, "load_state_file", lambda path, **kw: read.append(path) or load_state_file(path, **kw))
    resumed_scores = train(parse_spec(spec), interrupted, JsonlReporter(interrupted / "events.jsonl"))
    # Every file of the resume state, DeepSpeed's among them, was read without unpickling code.
    assert {Path(p).name for p in read} == {p.name for p in (interrupted / "resume").rglob("*.pt")}, read

    expected, got = metrics_by_step(straight), metrics_by_step(interrupted)  # step 3 ran twice; the rerun wins
    for step in range(3, 9):
        for name in ("loss", "pg_loss", "reverse_kl", "lm_loss", "reward"):
            assert got[step][name] == pytest.approx(expected[step][name], rel=1e-6, abs=1e-9), (step, name)
    assert resumed_scores["final"] == pytest.approx(straight_scores["final"], rel=1e-6)
    a = AutoModelForCausalLM.from_pretrained(straight / "checkpoints" / "step-000008").state_dict()
    b = AutoModelForCausalLM.from_pretrained(interrupted / "checkpoints" / "step-000008").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["kd", "minillm"])
def test_gradient_checkpointing_recomputes_every_student_layer_and_trains_alike(tmp_path, dataset, monkeypatch, method):
    """training.gradient_checkpointing: each training forward checkpoints both decoder layers of the student
    (their activations are recomputed in the backward), and the job trains to the same losses as without."""
    checkpointed = []

    def counting(function, *args, **kwargs):  # function: partial(forward, layer, ...)
        checkpointed.append(function.args[0])
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)
    settings = dict(method=method, eval={"every_steps": 0, "seeds": [10]}, checkpoints={"every_steps": 0})
    plain, _ = run(tmp_path, tiny_spec(dataset, training={"steps": 3}, **settings), "plain")
    assert checkpointed == []
    spec = tiny_spec(dataset, training={"steps": 3, "gradient_checkpointing": True}, **settings)
    recomputed, _ = run(tmp_path, spec, "recomputed")
    # KD: 3 steps × 2 layers. MiniLLM: the same, in its updates, which run the student without dropout (eval mode).
    assert len(checkpointed) == 3 * 2 and len({id(layer) for layer in checkpointed}) == 2
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in checkpointed)
    expected, got = metrics_by_step(plain), metrics_by_step(recomputed)
    assert [got[s]["loss"] for s in (1, 2, 3)] == pytest.approx([expected[s]["loss"] for s in (1, 2, 3)], rel=1e-6)


def test_checkpoint_retention_keeps_latest_and_best(tmp_path, dataset):
    out, _ = run(tmp_path, tiny_spec(dataset, checkpoints={"every_steps": 1, "keep": 2}))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept[-2:] == ["step-000005", "step-000006"] and len(kept) <= 3
    assert ckpt.best_step(out) in (3, 6) and ckpt.step_dir_name(ckpt.best_step(out)) in kept  # scored and saved
    assert [p.name for p in (out / "resume").iterdir()] == ["step-000006"]


def test_cancel_stops_at_next_step_and_keeps_checkpoints(tmp_path, dataset):
    out = tmp_path / "cancel"
    with pytest.raises(Cancelled):
        train(parse_spec(tiny_spec(dataset)), out, CancelAfter(out / "events.jsonl", step=4))
    events = read_events(out)
    assert events[-1]["data"]["state"] == "cancelled" and events[-1]["data"]["step"] == 4
    assert (out / "checkpoints" / "step-000003" / "config.json").exists()


def train_from_the_cli(tmp_path, spec, name, **env):
    """`distill train` in a fresh process (with resources.devices 2, under the DeepSpeed launcher); its
    output directory. `env`: variables to set."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / name
    # A fresh shell's environment: the in-process runs above set this process's rank variables.
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        },
        **env,
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "train", str(path), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_two_processes_under_the_deepspeed_launcher_and_a_teacher_sharded_over_them_trains_as_a_whole_one(
    tmp_path, dataset
):
    """MiniLLM on 2 processes under the DeepSpeed launcher, its teacher whole or split between them
    (deepspeed.shard_teacher): each process holds half the teacher, and the losses are those of the
    whole teacher, step by step. The run with a whole teacher is also the plain two-process job: its
    test-set samples come from both ranks in the test set's order, and its checkpoint loads.

    Every collective run of the teacher is on the way: teacher-mixed sampling over two phases and the
    scoring of the rollouts, the free text of the LM term and the teacher's test-set scores (each run
    has a cache of its own, so both compute them), and the KLs of the evaluations.

    Against the same ZeRO-3 student with a whole teacher, only the teacher differs: measured, the
    runs agree to the bit (the gathered weights are the very ones), and the tolerance, 1e-6
    relative, leaves room for float32 rounding in another order and none for a teacher computed
    wrongly.
    """
    base = dict(
        resources={"devices": 2},
        training={"steps": 3},
        data={"pretrain": "builtin:teacher-text", "teacher_text_documents": 2},
        minillm={"lm_chunk_tokens": 16},
        eval={"every_steps": 0, "seeds": [10]},
        checkpoints={"every_steps": 0},
    )
    runs = {}
    for name, deepspeed in (
        ("whole", {"zero_stage": 3}),
        ("sharded", {"zero_stage": 3, "shard_teacher": True}),
    ):
        cache = tmp_path / f"cache-{name}"  # the models and compiled ops are shared; the teacher's outputs are not
        cache.mkdir()
        (cache_dir() / "models").mkdir(exist_ok=True)
        (cache / "models").symlink_to(cache_dir() / "models")
        runs[name] = train_from_the_cli(
            tmp_path,
            tiny_spec(dataset, **base, deepspeed=deepspeed),
            name,
            DISTILL_CACHE_DIR=str(cache),
            TORCH_EXTENSIONS_DIR=str(cache_dir() / "torch_extensions"),
        )
    whole, sharded = (metrics_by_step(runs[name]) for name in ("whole", "sharded"))
    assert sorted(whole) == sorted(sharded) == [1, 2, 3]  # two phases of rollouts
    names = ("loss", "pg_loss", "reverse_kl", "lm_loss", "reward")
    for step in whole:
        for name in names:
            assert sharded[step][name] == pytest.approx(whole[step][name], rel=1e-6, abs=1e-7), (step, name)
    said = [e["message"] for e in read_events(runs["sharded"]) if e["message"].startswith("teacher sharded")]
    held = re.fullmatch(
        r"teacher sharded over 2 processes \(ZeRO-3\): rank 0 holds (\d+) of (\d+) parameters, "
        r"rank 1 holds (\d+)",
        said[0],
    )
    first, total, second = map(int, held.groups())
    assert first == pytest.approx(total / 2, rel=0.1) and second == pytest.approx(total / 2, rel=0.1), said
    assert not any(e["message"].startswith("teacher sharded") for e in read_events(runs["whole"]))

    events = read_events(runs["whole"])
    assert any("2 process(es)" in e["message"] for e in events)
    assert events[-1]["data"]["state"] == "succeeded"
    # The samples come from both ranks (each holds every other prompt), in the test set's order.
    in_order = [r.message for r in read_records(str(dataset / "eval.jsonl"))[:3]]
    tests = [e["data"] for e in events if e["type"] == "eval" and e["data"]["set"] == "test"]
    assert tests and all([s["prompt"] for s in e["samples"]] == in_order for e in tests)
    assert_loads_and_generates(runs["whole"] / "checkpoints" / "step-000003")


@pytest.mark.parametrize(
    "deepspeed",
    [
        {"zero_stage": 1, "precision": "bf16"},
        {"zero_stage": 2, "precision": "fp32", "offload_optimizer": True},
        {"zero_stage": 3, "precision": "bf16"},
    ],
    ids=["zero1-bf16", "zero2-offload", "zero3-bf16"],
)
def test_zero_stages_precisions_and_offload(tmp_path, dataset, deepspeed):
    spec = tiny_spec(
        dataset,
        training={"steps": 4},
        deepspeed=deepspeed,
        eval={"every_steps": 0},
        checkpoints={"every_steps": 2, "keep": 1},
    )
    out, scores = run(tmp_path, spec)
    assert math.isfinite(scores["final"]["reverse_kl"])
    assert json.loads((out / "resume" / "step-000004" / "trainer_state.json").read_text())["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000004")
    expected = torch.bfloat16 if deepspeed["precision"] == "bf16" else torch.float32
    assert model.dtype == expected
    assert_loads_and_generates(out / "checkpoints" / "step-000004")
    # DeepSpeed's files of the resume state too are read as tensors and plain values, never as code.
    written = sorted((out / "resume").rglob("*.pt"))
    assert any("optim_states" in path.name for path in written), written
    for path in written:
        ckpt.load_state_file(path)


class NotAState:
    def __reduce__(self):
        return (print, ("this ran while a resume state was read",))


def test_a_resume_state_file_holding_code_is_refused(tmp_path):
    torch.save({"weights": torch.ones(2), "payload": NotAState()}, tmp_path / "rank-0.pt")
    with pytest.raises(pickle.UnpicklingError, match="print"):
        ckpt.load_state_file(tmp_path / "rank-0.pt")


def test_fp16_on_cpu_is_refused_before_training(tmp_path, dataset):
    out = tmp_path / "fp16"
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        train(parse_spec(tiny_spec(dataset, deepspeed={"precision": "fp16"})), out, JsonlReporter(out / "events.jsonl"))
    failed = read_events(out)[-1]
    assert failed["data"]["state"] == "failed" and "fp16" in failed["data"]["error"]["message"]


def test_chat_records_train_and_a_parquet_test_set_scores_through_its_column_names(tmp_path, dataset):
    from datasets import Dataset

    def chat(r):
        return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": r.message}]}

    with (tmp_path / "chat.jsonl").open("w") as out:
        for r in read_records(str(dataset / "train.jsonl")):
            turns = chat(r)["messages"] + [{"role": "assistant", "content": r.response}]
            out.write(json.dumps({"messages": turns}) + "\n")
    held_out = read_records(str(dataset / "eval.jsonl"))
    Dataset.from_dict({"question": [r.message for r in held_out], "answer": [r.response for r in held_out]}).to_parquet(
        str(tmp_path / "test.parquet")
    )
    data = {
        "train": str(tmp_path / "chat.jsonl"),
        "eval": str(tmp_path / "test.parquet"),
        "columns": {"question": "prompt", "answer": "response"},
        "prompt_format": "chat",
    }
    spec = tiny_spec(dataset, method="kd", data=data, training={"steps": 2}, eval={"every_steps": 0})
    out, scores = run(tmp_path, spec)
    events = read_events(out)
    assert events[-1]["data"]["state"] == "succeeded" and sorted(metrics_by_step(out)) == [1, 2]
    test = next(e["data"] for e in events if e["type"] == "eval" and e["data"]["set"] == "test")
    assert [s["prompt"] for s in test["samples"]] == [r.message for r in held_out[:3]]
    assert [s["reference"] for s in test["samples"]] == [r.response for r in held_out[:3]]
