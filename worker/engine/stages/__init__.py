"""Training stages, one module per kind, and the table of what each method trains on.

A job runs an optional recovery stage (SFT or KD), then its method. `METHODS` is the one place that
says which stage class runs a method and which responses it trains on; the trainer prepares that
data and builds the stages from it.
"""

from __future__ import annotations

from ..spec import JobSpec
from .base import Method, Schedule
from .finetune import FinetuneStage
from .gkd import GKDStage
from .minillm import MiniLLMStage

METHODS: dict[str, Method] = {
    "sft": Method(FinetuneStage, responses="gold"),
    "kd": Method(FinetuneStage, responses="gold", word_kd=True),
    "seqkd": Method(FinetuneStage, responses="teacher-samples"),
    "minillm": Method(MiniLLMStage, responses="none"),
    # The responses of its off-policy micro-batches; with gkd.seq_kd or gkd.lmbda 1 it uses the prompts alone.
    "gkd": Method(GKDStage, responses="gold"),
}


def plan(spec: JobSpec) -> list[tuple[str, Method, Schedule]]:
    """(stage name, method, schedule) of each stage the job runs, in order."""
    stages = (
        [(f"recovery-{spec.recovery.method}", METHODS[spec.recovery.method], Schedule.of(spec.recovery))]
        if spec.recovery
        else []
    )
    return stages + [(spec.method, METHODS[spec.method], Schedule.of(spec.training))]


def needs(spec: JobSpec) -> set[str]:
    """What the job's stages train on: "none" (prompts only), "gold" or "teacher-samples" responses, and
    "pretrain" (data.pretrain, for MiniLLM's LM term)."""
    return set().union(*(method.stage.needs(method, spec) for _, method, _ in plan(spec)))
