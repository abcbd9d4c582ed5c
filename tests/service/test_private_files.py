"""Secret files are 0600 from birth, written whole, and created once however many processes race."""

import multiprocessing
import stat

from app.core.files import create_private_once, write_private


def _create(args):
    path, text = args
    return create_private_once(path, text)


def test_racing_creators_all_read_the_one_file_that_won(tmp_path):
    path = tmp_path / "secret_key"
    with multiprocessing.get_context("fork").Pool(8) as pool:
        seen = pool.map(_create, [(path, f"key-{i}") for i in range(32)])
    assert len(set(seen)) == 1 and seen[0].startswith("key-")  # one winner, read by everyone
    assert path.read_text() == seen[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]  # no temporary files left


def test_write_private_replaces_whole_and_private(tmp_path):
    path = tmp_path / "token"
    write_private(path, "first")
    write_private(path, "second")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]
