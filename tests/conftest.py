import json
from pathlib import Path

import pytest

from worker.engine.paths import PROJECT_ROOT

DOLLY = PROJECT_ROOT.parent / "shared" / "data" / "dolly"


@pytest.fixture(scope="session")
def dolly() -> Path:
    """The Dolly records beside the checkout (shared/data/dolly): read by path, never copied."""
    if not (DOLLY / "dev.jsonl").exists():
        pytest.fail(f"{DOLLY} is missing: tests read the Dolly records from shared/data beside the checkout")
    return DOLLY


def tiny_spec(dolly: Path, **overrides) -> dict:
    """A job on the tiny random models that finishes in seconds; sections in `overrides` are merged."""
    spec = {
        "name": "tiny",
        "method": "minillm",
        "teacher": "builtin:tiny-teacher",
        "student": {"model": "builtin:tiny-student"},
        "data": {"train": str(dolly / "dev.jsonl"), "eval": str(dolly / "valid.jsonl"), "prompt_format": "alpaca",
                 "max_prompt_tokens": 128, "max_response_tokens": 12, "max_train_records": 48},
        "training": {"steps": 6, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
        "minillm": {"rollouts_per_phase": 4, "rollout_batch_size": 4, "ppo_epochs": 2},
        "eval": {"every_steps": 3, "num_prompts": 4, "batch_size": 4},
        "checkpoints": {"every_steps": 3, "keep": 2},
        "deepspeed": {"precision": "fp32"},
    }  # fmt: skip
    for key, value in overrides.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def read_events(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines()]
