"""Atomic directories: a killed writer leaves no folder under the final name, and of two parallel
writers the first to finish is kept. Atomic files and folders get the modes the umask gives."""

import os
import stat

import pytest

from plumbing.io import atomic_write_text, build_directory


def complete(folder):
    return any(folder.iterdir())


def test_a_built_directory_appears_whole_and_leaves_no_temporary_folder(tmp_path):
    def fill(folder):
        assert not (tmp_path / "entry").exists()  # nothing under the final name while filling
        (folder / "a.txt").write_text("a")

    assert build_directory(tmp_path / "entry", fill, complete) == tmp_path / "entry"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]
    assert (tmp_path / "entry" / "a.txt").read_text() == "a"


def test_a_writer_killed_while_filling_leaves_nothing(tmp_path):
    def dying(folder):
        (folder / "partial").write_text("x")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        build_directory(tmp_path / "entry", dying, complete)
    assert list(tmp_path.iterdir()) == []


def test_the_first_of_two_writers_to_finish_is_kept(tmp_path):
    def slower(folder):  # another writer finishes while this one fills
        build_directory(tmp_path / "entry", lambda f: (f / "first").write_text("1"), complete)
        (folder / "second").write_text("2")

    assert build_directory(tmp_path / "entry", slower, complete) == tmp_path / "entry"
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["first"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_an_incomplete_folder_under_the_final_name_is_replaced(tmp_path):
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "adapter").write_text("old")  # its marker (meta.json) deleted

    def marked(folder):
        (folder / "adapter").write_text("new")
        (folder / "meta.json").write_text("{}")

    build_directory(tmp_path / "entry", marked, lambda f: (f / "meta.json").is_file())
    assert (tmp_path / "entry" / "adapter").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_modes_the_umask_gives_not_private_ones(tmp_path, umask):
    """Results, generations and the stage cache are read by a team's other users when the umask
    allows it (tempfile would make every file 0600 and every folder 0700)."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}\n")
        built = build_directory(
            tmp_path / "entry", lambda d: (d / "meta.json").write_text("{}"), complete
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(built.stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "results.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "results.json"]
