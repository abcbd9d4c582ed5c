"""Each method's default learning rate, measured: the method trained from one start at a few rates, and
the rate whose model scores best on the selection set wins.

    .venv/bin/python bench/learning_rates.py --data ../shared/data     # 75 minutes on 2 cores

The demo pair (the SmolLM2-135M-Instruct teacher, not fine-tuned, and a student of 10 of its layers),
the first Dolly training records of `--data` (see bench/quality_study.py), `--steps` steps at batch 8
and the study's recipe otherwise (constant rate after a short warm-up; MiniLLM with 4 PPO epochs and
teacher mix 0.2; GKD at TRL's defaults). SFT, KD, SeqKD start from the cut student; MiniLLM and GKD, as
in the paper, from the SFT run at its best rate. Each run is scored once at its end on the selection
set (the last `--selection-prompts` training records, never trained on) under `--selection-seeds`.

It writes docs/learning-rates.json (every rate's score per seed, and the winners) and the table in
docs/learning-rates.md. The winners are `DEFAULT_LEARNING_RATES` in worker/engine/spec.py; rerun this
after changing a method's loss or recipe. They are measured at this scale: a short run of a small model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from quality_study import PRESETS, Study, command, machine, parse_args, selection_scores
from report import write_block

from worker.engine.paths import PROJECT_ROOT

GRID = {
    "sft": [3e-5, 1e-4, 3e-4],
    "kd": [3e-5, 1e-4, 3e-4],
    "seqkd": [3e-5, 1e-4, 3e-4],
    # Two rates each for the two costly on-policy methods: MiniLLM's paper rate and the first study's pick
    # (2e-5 over 1e-4); for GKD, TRL's default (2e-5) and five times it.
    "gkd": [2e-5, 1e-4],
    "minillm": [5e-6, 2e-5],
}
FROM_SFT = ("gkd", "minillm")


def sweep(args) -> dict:
    study = Study(
        parse_args(
            [
                "--data",
                str(args.data),
                "--out",
                str(args.out),
                "--train-records",
                str(args.train_records),
                "--selection-prompts",
                str(args.selection_prompts),
                "--selection-seeds",
                *map(str, args.selection_seeds),
                "--select-every",
                str(args.steps),
                "--warmup-steps",
                "5",
            ]
        )
    )
    teacher, start = study.args.teacher, {"model": str(study.student())}
    found = {}
    for method, rates in GRID.items():
        if method in FROM_SFT:
            best_sft = found["sft"]["best"]
            start = {"model": str(found["sft"]["runs"][best_sft].selected)}
        runs, scores = {}, {}
        for lr in rates:
            spec = study.spec(
                f"lr-{method}-{lr:g}", method, teacher, start, args.steps, lr, minillm=study.minillm_recipe()
            )
            run = study.run(f"lr-{method}-{lr:g}", spec)
            final = selection_scores(run.events)[args.steps]
            runs[f"{lr:g}"], scores[f"{lr:g}"] = run, {"rouge_l": final["rouge_l"], "per_seed": final["per_seed"]}
        best = max(scores, key=lambda lr: scores[lr]["rouge_l"])
        found[method] = {"runs": runs, "scores": scores, "best": best}
    return {
        "command": command(args, "bench/learning_rates.py"),
        "machine": machine(),
        "steps": args.steps,
        "train_records": args.train_records - args.selection_prompts,
        "selection": {"prompts": args.selection_prompts, "seeds": args.selection_seeds},
        "start": {m: "the SFT run at its best rate" if m in FROM_SFT else "the cut student" for m in GRID},
        "methods": {m: {"selection_rouge_l": f["scores"], "best": float(f["best"])} for m, f in found.items()},
    }


def table(res: dict) -> str:
    rows = ["| method | start | learning rate → selection Rouge-L (± seed sd) | best |", "|---|---|---|---|"]
    for method, found in res["methods"].items():
        cells = []
        for lr, score in found["selection_rouge_l"].items():
            seeds = list((score["per_seed"] or {}).values())
            spread = f" ± {statistics.stdev(s['rouge_l'] for s in seeds):.2f}" if len(seeds) > 1 else ""
            cells.append(f"{lr}: {score['rouge_l']:.2f}{spread}")
        rows.append(f"| {method} | {res['start'][method]} | {', '.join(cells)} | {found['best']:g} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    cpu = PRESETS["cpu"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the folder of the paper's sets (bench/quality_study.py)")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "learning-rates", help="runs, kept to resume")
    p.add_argument("--docs", type=Path, default=PROJECT_ROOT / "docs")
    p.add_argument("--steps", type=int, default=40, help="steps of every run")
    p.add_argument("--train-records", type=int, default=464, help="Dolly training records, the selection set included")
    p.add_argument("--selection-prompts", type=int, default=48)
    p.add_argument("--selection-seeds", type=int, nargs="+", default=cpu["selection_seeds"])
    args = p.parse_args(argv)
    args.data, args.argv = args.data.resolve(), argv if argv is not None else sys.argv[1:]
    res = sweep(args)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "learning-rates.json").write_text(json.dumps(res, indent=2) + "\n")
    block = f"`{res['command']}`; machine: {res['machine']}.\n\n{table(res)}"
    write_block(args.docs / "learning-rates.md", "learning_rates.py", block, "Default learning rates")
    print(table(res))


if __name__ == "__main__":
    main()
