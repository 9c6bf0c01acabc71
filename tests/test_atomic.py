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


def test_saved_tensors_are_readable_like_other_files_and_a_full_disk_is_an_os_error(tmp_path, monkeypatch):
    """safetensors creates its files owner-only (0600); a merged model or an adapter must
    be readable as any file the user writes (0644 under the usual umask 022)."""
    import os

    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from l1ra_lite.atomic import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors({"w": torch.ones(2)}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert safetensors.torch.load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [1.0, 1.0]

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        save_tensors({"w": torch.ones(2)}, tmp_path / "b.safetensors")
