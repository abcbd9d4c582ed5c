"""Checkpoints: a Hugging Face directory per saved step, plus the state to resume exactly.

    OUTPUT/checkpoints/step-000100/   config, model.safetensors, tokenizer, generation config, README.md
    OUTPUT/resume/step-000100/        DeepSpeed engine state (optimizer, scheduler, fp32 master weights),
                                      rank-N.pt (each rank's trainer state), trainer_state.json

The Hugging Face directory is what people download; the resume state is large (optimizer moments)
and only the newest one is kept. `trainer_state.json` is written last, by rank 0, after every rank
has finished: a resume directory without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .data import held_out_source
from .distributed import barrier, rank
from .paths import RESUME_STATE_FILE
from .references import looks_like_hub_id
from .spec import JobSpec


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _steps(root: Path, marker: str | None = None) -> list[int]:
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("step-*"):
        if d.is_dir() and d.name[5:].isdigit() and (marker is None or (d / marker).exists()):
            found.append(int(d.name[5:]))
    return sorted(found)


def saved_steps(output_dir: Path) -> list[int]:
    return _steps(output_dir / "checkpoints", "config.json")


def latest_resume_state(output_dir: Path) -> tuple[Path, dict] | None:
    steps = _steps(output_dir / "resume", RESUME_STATE_FILE)
    if not steps:
        return None
    path = output_dir / "resume" / step_dir_name(steps[-1])
    return path, json.loads((path / RESUME_STATE_FILE).read_text())


def best_step(output_dir: Path) -> int | None:
    """The step of the run's best checkpoint, as the trainer recorded it (None before any is evaluated)."""
    found = latest_resume_state(output_dir)
    return found[1]["best"][1] if found and found[1]["best"] else None


# The method's paper, for the card's text and the hub's arxiv: tag (SFT is no one paper's method).
PAPERS = {
    "minillm": ("MiniLLM: Knowledge Distillation of Large Language Models (Gu et al., 2023)", "2306.08543"),
    "gkd": (
        "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes (Agarwal et al., 2024)",
        "2306.13649",
    ),
    "kd": ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "1503.02531"),
    "seqkd": ("Sequence-Level Knowledge Distillation (Kim and Rush, 2016)", "1606.07947"),
}
METHODS = {
    "minillm": "MiniLLM (reverse KL, policy gradient on the student's own samples)",
    "gkd": "generalised knowledge distillation (a generalised JSD on the student's own samples and fixed responses)",
    "kd": "word-level knowledge distillation (forward KL on the gold responses)",
    "seqkd": "sequence-level knowledge distillation (fine-tuning on the teacher's samples)",
    "sft": "supervised fine-tuning on the gold responses",
}
# Builtin models that are published models under another name: the card links the original.
BUILTIN_ORIGINS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
METRIC_NAMES = {
    "rouge_l": ("rougeL", "Rouge-L F1 x100"),
    "reverse_kl": ("reverse_kl", "Reverse KL to the teacher"),
    "forward_kl": ("forward_kl", "Forward KL to the teacher"),
    "distinct_4": ("distinct_4", "Distinct-4"),
    "response_length": ("response_length", "Mean response length (tokens)"),
}


def _public_data(ref: str | None) -> str | None:
    """A data reference as the card may show it (the card is downloaded, and may be pushed to a
    public hub): a builtin as it is, a file by its name only, never a server path."""
    return ref if ref is None or ref.startswith("builtin:") else Path(ref).name


def _public_model(ref: str) -> str:
    """A model reference as the card may show it: a hub id or builtin as it is, a directory by its name;
    a checkpoint of an earlier run (`RUN/checkpoints/step-N`, as this module writes them) as
    `job:RUN@step-N`, the reference the service takes for it: the model's lineage."""
    ref = ref.removeprefix("hub:")  # the form the service hands hub ids to the engine in
    if ref.startswith("builtin:") or (looks_like_hub_id(ref) and not Path(ref).is_dir()):
        return ref
    path = Path(ref)
    if path.parent.name == "checkpoints" and re.fullmatch(r"step-[0-9]+", path.name):
        return f"job:{path.parent.parent.name}@step-{int(path.name.removeprefix('step-'))}"
    return path.name


def _hub_model(ref: str) -> str | None:
    """The hub id a model reference stands for, if any (a builtin converted from a published model counts)."""
    ref = _public_model(ref)
    if ref in BUILTIN_ORIGINS:
        return BUILTIN_ORIGINS[ref]
    return ref if looks_like_hub_id(ref) and not ref.startswith("builtin:") else None


def model_card(
    spec: JobSpec,
    step: int,
    scores: dict[str, dict[str, float]],
    selection: dict[str, float] | None,
    best: tuple[float, int] | None,
) -> str:
    """README.md for the Hugging Face directory: what this model is and how it scored, with the hub's
    metadata (base model, datasets, model-index) so that a checkpoint pushed to a hub shows its scores.

    `scores`: test-set scores by label (teacher, initial, final, best); `selection`: this checkpoint's
    selection-set scores, if they were taken; `best`: (selection Rouge-L, step) of the best checkpoint.
    The model-index holds this checkpoint's own scores only: the test set's when it is the final
    model (the teacher's and the initial student's are in the table, not claimed as this model's),
    and the selection set's at this step.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData  # the engine's only use of the hub library

    init = spec.student.init_from_teacher
    origin = spec.student.model or spec.teacher  # the weights the student started from
    student = (
        _public_model(spec.student.model)
        if spec.student.model
        else f"{init.num_layers} layers of the teacher ({init.strategy})"
    )
    stages = (f"{spec.recovery.method} for {spec.recovery.steps} steps, then " if spec.recovery else "") + (
        f"{spec.method} for {spec.training.steps} steps"
    )
    held_out = "held out from the training set"
    test_set = _public_data(held_out_source(spec.data.train, spec.data.eval, "eval")) or held_out
    selection_set = _public_data(held_out_source(spec.data.train, spec.data.selection, "selection")) or held_out
    named = [getattr(spec.data, k) for k in ("train", "selection", "eval", "pretrain")] + [test_set, selection_set]
    datasets = sorted({d for d in named if d and d.startswith("builtin:")})  # data is never a hub id here

    results = []
    own = {"test": scores.get("final") if step == spec.total_steps else None, "selection": selection}
    if own["test"] is None and best and best[1] == step:
        own["test"] = scores.get("best")
    for split, source in (("test", test_set), ("selection", selection_set)):
        for metric, value in (own[split] or {}).items():
            kind, name = METRIC_NAMES.get(metric, (metric, metric))
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=source,
                    dataset_name=f"{split} set: {source}",
                    dataset_split=split,
                    metric_type=kind,
                    metric_name=name,
                    metric_value=float(value),
                )
            )
    paper = PAPERS.get(spec.method)
    data = ModelCardData(
        model_name=f"{spec.name} (step {step})",
        base_model=_hub_model(origin),
        datasets=datasets or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["distillation", spec.method, "distill"] + ([f"arxiv:{paper[1]}"] if paper else []),
        eval_results=results or None,
    )
    lines = [
        f"# {spec.name} (step {step})",
        "",
        f"Distilled by the distill service with {METHODS[spec.method]}"
        + (f", after [{paper[0]}](https://arxiv.org/abs/{paper[1]})." if paper else "."),
        "",
        f"- Method: `{spec.method}`",
        f"- Teacher: `{_public_model(spec.teacher)}`",
        f"- Student initialisation: `{student}`",
        f"- Training data: `{_public_data(spec.data.train)}` (prompt format `{spec.data.prompt_format}`)",
        f"- Schedule: {stages}; this checkpoint is after step {step} of {spec.total_steps}",
        f"- Batch {spec.training.batch_size} x {spec.training.gradient_accumulation} accumulation x "
        f"{spec.resources.devices} device(s), learning rate {spec.training.learning_rate:g}",
        f"- Precision `{spec.deepspeed.precision}`, ZeRO stage {spec.deepspeed.zero_stage}, seed {spec.training.seed}",
        "",
    ]
    if scores:
        metrics = sorted({k for s in scores.values() for k in s})
        lines += [
            "## Evaluation",
            "",
            f"Test set `{test_set}`, up to "
            f"{spec.eval.num_prompts} prompts, sampled at temperature 1 once per seed {spec.eval.seeds} (no repeated "
            f"{spec.eval.no_repeat_ngram_size}-grams); each score is the mean over the seeds. `best` is the checkpoint "
            "with the highest selection-set Rouge-L.",
            "",
            "| model | " + " | ".join(metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for label, values in scores.items():
            lines.append(
                f"| {label} | " + " | ".join(f"{values[m]:.3f}" if m in values else "" for m in metrics) + " |"
            )
        lines.append("")
    if selection:
        lines += [
            f"Selection set `{selection_set}`: Rouge-L {selection['rouge_l']:.3f} at this step"
            + (f"; the best so far is step {best[1]} ({best[0]:.3f})." if best else "."),
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    # ModelCard checks the metadata as it parses it: a card the hub would refuse fails here, not at a push.
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines)))


def export_model(engine, tokenizer, out: Path, card: str, zero_stage: int) -> None:
    """Write the student as a Hugging Face directory (rank 0 writes; under ZeRO-3 all ranks gather)."""
    partial = out.with_name("." + out.name + ".partial")

    def write() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        engine.module.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "README.md").write_text(card)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank() == 0:
                write()
    elif rank() == 0:
        write()
    barrier()


def save_resume_state(engine, out: Path, trainer_state: dict, rank_state: dict) -> None:
    """All ranks call this. Older resume states are removed once the new one is complete."""
    engine.save_checkpoint(str(out), tag="engine")
    torch.save(rank_state, out / f"rank-{rank()}.pt")
    barrier()
    if rank() == 0:
        (out / RESUME_STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        for old in out.parent.glob("step-*"):
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
    barrier()


def deepspeed_state_classes() -> list[type]:
    """The classes DeepSpeed's optimizer states hold besides tensors and plain values, allowed by name when
    they are read (found with torch.serialization.get_unsafe_globals_in_checkpoint at ZeRO 0-3;
    test_zero_stages_precisions_and_offload reads every file those runs write)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_state_file(path: str | Path, map_location=None):
    """A file of a resume state, read with torch.load(weights_only=True): tensors, plain values and
    `deepspeed_state_classes`, never code. DeepSpeed's own loader unpickles whatever a file holds."""
    with torch.serialization.safe_globals(deepspeed_state_classes()):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_resume_state(engine, path: Path) -> dict:
    engine.checkpoint_engine.load = load_state_file  # DeepSpeed's files are read as ours are
    engine.load_checkpoint(str(path), tag="engine")
    return load_state_file(path / f"rank-{rank()}.pt")


def prune_checkpoints(output_dir: Path, keep: int, protect: set[int]) -> None:
    if rank() != 0:
        return
    steps = saved_steps(output_dir)
    for step in steps[:-keep]:
        if step not in protect:
            shutil.rmtree(output_dir / "checkpoints" / step_dir_name(step), ignore_errors=True)
