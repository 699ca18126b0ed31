"""Atomic run outputs: a failed write leaves the previous version intact."""

import json

import pytest

from train.outputs import write_atomic, write_dir_atomic, write_text_atomic


def test_failed_file_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, json.dumps({"accuracy": 0.5}))

    def crash(tmp):
        tmp.write_text('{"accura')  # half written, then the process dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, crash)
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "hf"
    write_dir_atomic(target, lambda tmp: (tmp / "config.json").write_text("{}"))

    def crash(tmp):
        (tmp / "model.safetensors").write_bytes(b"\\x00" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_dir_atomic(target, crash)
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    write_dir_atomic(target, lambda tmp: (tmp / "new.json").write_text("{}"))
    assert sorted(p.name for p in target.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_full_disk_is_one_line_and_other_errors_stay_bugs(tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    from data.errors import UserError
    from train import outputs

    target = tmp_path / "hf"
    write_dir_atomic(target, lambda tmp: (tmp / "config.json").write_text("{}"))

    def fills_the_disk(tmp):
        (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=f"no space left in {tmp_path} to write hf"):
        write_dir_atomic(target, fills_the_disk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]

    def comes_up_short(tmp):  # torch.save on a full disk says only this
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29440 vs 29332")

    with pytest.raises(RuntimeError, match="unexpected pos"):  # room left: a bug, traceback kept
        write_atomic(tmp_path / "state.pt", comes_up_short)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    with pytest.raises(UserError, match="to write state.pt"):
        write_atomic(tmp_path / "state.pt", comes_up_short)
