from pathlib import Path

import pytest
from helpers import write_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A small instruction set in the Dolly layout, written by the tests (see `write_dataset`)."""
    return write_dataset(tmp_path_factory.mktemp("dataset"))


# The test files that take longest (pytest --durations, two processes, AVX2), longest first. `make test`
# hands whole files to its processes in collection order: starting these first lets the many short files
# fill in behind them, so that both processes finish at about the same time.
LONGEST_FIRST = (
    "test_engine_e2e.py",
    "test_worker.py",
    "test_cancel.py",
    "test_db_outage.py",
    "test_s3.py",
    "test_frontend.py",
    "test_cli.py",
    "test_webhooks.py",
    "test_node_group.py",
    "test_devices.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
