"""Write aside, then rename: the target is always the old complete one or the new one."""

import pytest

from l1ra_lite.atomic import remove_atomically, replace_dir_atomically, written_aside


def aside(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_folder_replaces_a_folder_or_a_file_and_nothing_is_left_aside(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    replace_dir_atomically(target, lambda folder: (folder / "new.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    target_file = tmp_path / "file"
    target_file.write_text("old")
    with written_aside(target_file) as temp:
        temp.mkdir()
    assert target_file.is_dir() and aside(tmp_path) == []


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with written_aside(target) as temp:
            temp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and aside(tmp_path) == []


def test_a_link_is_replaced_not_what_it_points_to(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "data").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(kept)
    with written_aside(link) as temp:
        temp.write_text("new")
    assert link.read_text() == "new" and not link.is_symlink()
    assert (kept / "data").read_text() == "keep me"


def test_removal_goes_through_a_hidden_name(tmp_path, monkeypatch):
    from l1ra_lite import atomic

    doomed = tmp_path / "checkpoint-3"
    doomed.mkdir()
    (doomed / "manifest.json").write_text("{}")
    deleted = []
    real_rmtree = atomic.shutil.rmtree

    def rmtree(path, **kwargs):
        deleted.append((path.name, doomed.exists()))  # a kill here: no half checkpoint-3
        real_rmtree(path, **kwargs)

    monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
    remove_atomically(doomed)
    assert [(name.startswith(".checkpoint-3.old-"), there) for name, there in deleted] == [(True, False)]
    assert list(tmp_path.iterdir()) == []
