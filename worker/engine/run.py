"""Run a job spec in this process, or under the DeepSpeed launcher when it asks for several devices.

`python -m worker.engine.run SPEC --output DIR` is what each launched process executes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .events import Fanout, JsonlReporter, ProgressBarReporter
from .spec import JobSpec, load_spec
from .trackers import trackers_for
from .trainer import train


def reporter_for(spec: JobSpec, output_dir: Path) -> Fanout:
    """events.jsonl plus a progress bar and the job's trackers; touching DIR/CANCEL stops the job at the next step."""
    jsonl = JsonlReporter(output_dir / "events.jsonl", cancel_file=output_dir / "CANCEL")
    return Fanout(jsonl, ProgressBarReporter(), *trackers_for(spec, output_dir))


def run(spec_path: Path, output_dir: Path) -> dict:
    """Train in this process (one rank of a launched group, or alone). Returns the eval scores."""
    spec = load_spec(spec_path)
    return train(spec, output_dir, reporter_for(spec, output_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--local_rank", type=int, default=None, help="set by the DeepSpeed launcher (LOCAL_RANK is used)"
    )
    args = parser.parse_args()
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank or 0))
    run(args.spec, args.output)


if __name__ == "__main__":
    main()
