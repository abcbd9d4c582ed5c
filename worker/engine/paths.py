"""Where the engine keeps things it builds once and reuses (converted models, teacher outputs)."""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """`DISTILL_CACHE_DIR`, else `.cache/` in the project checkout (never the home directory)."""
    path = Path(os.environ.get("DISTILL_CACHE_DIR") or PROJECT_ROOT / ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_project_extension_dir() -> None:
    """DeepSpeed JIT-compiles ops into TORCH_EXTENSIONS_DIR (default: under ~); keep them in the cache."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
