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
