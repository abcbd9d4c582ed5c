"""A user's clone has only the checkout: tests, examples and the two README commands read nothing beside it.

This project's own machines have a data folder next to the checkout, which a user's
clone does not. Three guards keep it from becoming a silent dependency again:

- no file the default commands read names it;
- every path in the example specs is builtin or inside the checkout;
- `examples/tiny.yaml` trains from a working directory outside the checkout, with every file opened
  beside the checkout refused (an audit hook in the training process).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine.paths import PROJECT_ROOT
from worker.engine.spec import load_spec

BESIDE = PROJECT_ROOT.parent
# What the default commands read: the test suite, the examples, the make targets, CI and its scripts.
DEFAULT_INPUTS = ["tests", "examples", "scripts", ".ci", "Makefile"]


def _tracked(paths: list[str]) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--", *paths], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    return [PROJECT_ROOT / line for line in out.stdout.splitlines()]


def test_no_default_input_names_the_folder_beside_the_checkout():
    # Joined at run time, so that neither this file nor its compiled bytecode matches itself.
    needles = ["/".join(("..", "shared")), "/".join(("shared", "data"))]
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}: {needle}"
        for path in _tracked(DEFAULT_INPUTS)
        if path.is_file() and path.suffix not in (".png",)
        for needle in needles
        if needle in path.read_text(errors="ignore")
    ]
    assert not offenders, f"these name a folder a user's clone does not have: {offenders}"


@pytest.mark.parametrize("example", sorted(p.name for p in (PROJECT_ROOT / "examples").glob("*.yaml")))
def test_example_specs_name_only_builtins_or_files_in_the_checkout(example):
    spec = load_spec(PROJECT_ROOT / "examples" / example)
    references = [
        spec.teacher,
        spec.student.model,
        spec.data.train,
        spec.data.selection,
        spec.data.eval,
        spec.data.pretrain,
    ]
    for ref in filter(None, references):
        if ref.startswith("builtin:"):
            continue
        resolved = (PROJECT_ROOT / Path(ref).expanduser()).resolve()
        assert resolved.is_relative_to(PROJECT_ROOT), f"{example} names {ref}, outside the checkout"


# Runs in the training process before anything else: opening a file beside the checkout fails.
_GUARD = """
import os, sys
beside, root = os.environ["GUARD_BESIDE"], os.environ["GUARD_ROOT"]
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(beside + os.sep) and not (path + os.sep).startswith(root + os.sep):
            raise PermissionError(f"read outside the checkout: {path}")
sys.addaudithook(hook)
sys.argv = ["distill", *sys.argv[1:]]
from app.cli import main
main()
"""


@pytest.mark.slow
def test_tiny_example_trains_from_outside_the_checkout_reading_nothing_beside_it(tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    spec = PROJECT_ROOT / "examples" / "tiny.yaml"
    env = {**os.environ, "GUARD_BESIDE": str(BESIDE), "GUARD_ROOT": str(PROJECT_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _GUARD, "train", str(spec), "--output", str(tmp_path / "out")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints").is_dir()
    assert "read outside the checkout" not in result.stderr
