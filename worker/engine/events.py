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
from typing import Literal, Protocol, TextIO

from tqdm import tqdm

from distill_client.status import TERMINAL

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


class LogLineReporter:
    """A line a person can read for each step and each event that says something, written to a text
    stream: a training process's output, which is its job's log (`distill logs`, the page's log)."""

    SHOWN = ("loss", "reverse_kl", "reward", "pg_loss", "lm_loss", "clip_fraction", "lr")  # in this order

    def __init__(self, stream: TextIO):
        self.stream, self.total_steps = stream, None

    def emit(self, event: Event) -> None:
        if event.type == "progress":
            self.total_steps = event.data["total_steps"]
            return
        line = self.step_line(event.data) if event.type == "metrics" else event.message
        if line:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.time))
            self.stream.write(f"{stamp} {event.level:<7} {line}\n")
            self.stream.flush()  # the log is read while the job runs

    def step_line(self, data: dict) -> str:
        """`step 3/40 minillm: loss 0.2531, reverse_kl 0.1204, lr 5e-06, 912 tokens/s`."""
        values = data["values"]
        of = f"/{self.total_steps}" if self.total_steps else ""
        shown = [f"{k} {values[k]:.4g}" for k in self.SHOWN if k in values]
        if "tokens_per_s" in values:
            shown.append(f"{values['tokens_per_s']:.0f} tokens/s")
        return f"step {data['step']}{of} {data['stage']}: " + ", ".join(shown)

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
