"""diffscaler.atomic: the one tmp-then-rename helper every writer of a result file uses."""

import pytest

from diffscaler.atomic import atomic_path, copy_file_atomic, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "fid.json"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["fid.json"]


def test_the_temporary_keeps_the_suffix_and_the_rename_replaces(tmp_path):
    target = tmp_path / "grid.png"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and tmp.name.startswith(".grid.")
        tmp.write_bytes(b"new")
    copy_file_atomic(target, tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 2
