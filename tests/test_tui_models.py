"""Where the picker finds models: a config file or a folder it cannot read is a problem shown in
the picker, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.tui.models import configured_dirs, find_models


def write_config(home: Path, content: bytes) -> None:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "config.toml").write_bytes(content)


def test_a_config_file_that_is_not_utf8_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    write_config(tmp_path, b'model_dirs = ["/models/caf\xe9"]\n')    # Latin-1, not UTF-8
    assert configured_dirs() == ([], f"{tmp_path}/config/config.toml: cannot read it (it is not UTF-8 text)")
    entries, problems = find_models()
    assert entries[0].where == "built-in" and any("not UTF-8" in p for p in problems)


def test_a_folder_in_model_dirs_that_cannot_be_read_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    overlong = tmp_path / ("m" * 300)                         # a name longer than any file system takes
    write_config(tmp_path, f'model_dirs = ["{overlong}"]\n'.encode())
    _, problems = find_models()
    assert any(str(overlong) in p and "cannot read it (File name too long)" in p for p in problems), problems


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_a_folder_without_read_permission_is_a_problem_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    locked = tmp_path / "locked"
    (locked / "some-model").mkdir(parents=True)
    (locked / "some-model" / "config.json").write_text("{}")
    locked.chmod(0o000)
    try:
        write_config(tmp_path, f'model_dirs = ["{locked}"]\n'.encode())
        _, problems = find_models()
    finally:
        locked.chmod(0o755)
    assert any(str(locked) in p and "Permission denied" in p for p in problems), problems
