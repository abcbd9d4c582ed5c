from pathlib import Path

import pytest
from helpers import write_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small instruction set in the Dolly layout, written by the tests (see `write_dataset`)."""
    return write_dataset(tmp_path_factory.mktemp("dataset"))
