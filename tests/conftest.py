from pathlib import Path

import pytest

from helpers import DOLLY


@pytest.fixture(scope="session")
def dolly() -> Path:
    """The Dolly records beside the checkout (shared/data/dolly): read by path, never copied."""
    if not (DOLLY / "dev.jsonl").exists():
        pytest.fail(f"{DOLLY} is missing: tests read the Dolly records from shared/data beside the checkout")
    return DOLLY
