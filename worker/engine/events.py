"""How the trainer reports: one callback interface for state changes, metrics, evals, checkpoints, logs.

The trainer calls `reporter.emit(Event(...))` and `reporter.should_cancel()` and knows nothing about
who listens: the CLI writes `events.jsonl` and draws a progress bar; the job service stores the same
events in its database. Only rank 0 reports.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from tqdm import tqdm

from .status import TERMINAL

EventType = Literal["state", "progress", "metrics", "eval", "checkpoint", "log"]


@dataclass
class Event:
    """`state` data: {state}; `progress`: {step, total_steps}; `metrics`: {step, values};
    `eval`: {step, label, set, scores, per_seed, samples: [{prompt, reference, response}]}; `checkpoint`: {step, path};
    `log`: message only."""

    type: EventType
    message: str = ""
    level: Literal["debug", "info", "warning", "error"] = "info"
    data: dict = field(default_factory=dict)
    time: float = field(default_factory=time.time)


class Reporter(Protocol):
    def emit(self, event: Event) -> None: ...

    def should_cancel(self) -> bool: ...


class JsonlReporter:
    """Appends every event to a JSON Lines file (kept across resumes) and cancels on a marker file."""

    def __init__(self, path: Path, cancel_file: Path | None = None):
        self.path, self.cancel_file = path, cancel_file
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: Event) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(asdict(event)) + "\n")

    def should_cancel(self) -> bool:
        return self.cancel_file is not None and self.cancel_file.exists()


class ProgressBarReporter:
    """A progress bar over optimizer steps with the latest metrics; evals and logs print above it."""

    SHOWN = ("loss", "reward", "reverse_kl", "lr", "tokens_per_s")

    def __init__(self):
        self.bar: tqdm | None = None

    def emit(self, event: Event) -> None:
        if event.type == "progress":
            if self.bar is None:
                self.bar = tqdm(total=event.data["total_steps"], unit="step", dynamic_ncols=True)
            self.bar.n = event.data["step"]
            self.bar.refresh()
        elif event.type == "metrics" and self.bar is not None:
            values = event.data["values"]
            self.bar.set_postfix({k: f"{values[k]:.3g}" for k in self.SHOWN if k in values}, refresh=True)
        elif event.type in ("eval", "checkpoint", "log", "state") and event.message:
            tqdm.write(event.message)
        if event.type == "state" and event.data.get("state") in TERMINAL and self.bar:
            self.bar.close()

    def should_cancel(self) -> bool:
        return False


class Fanout:
    """Sends each event to several reporters; cancels when any of them asks."""

    def __init__(self, *reporters: Reporter):
        self.reporters = reporters

    def emit(self, event: Event) -> None:
        for reporter in self.reporters:
            reporter.emit(event)

    def should_cancel(self) -> bool:
        return any(r.should_cancel() for r in self.reporters)
