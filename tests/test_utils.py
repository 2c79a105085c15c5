"""interpzoo.utils: did-you-mean hints and the one atomic-write implementation (and its users)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from interpzoo import utils
from interpzoo.checkpoint_io import atomic_torch_save
from interpzoo.io import write_json as write_json_plain
from interpzoo.utils import atomic_open, atomic_write_bytes, atomic_write_text, did_you_mean, write_json


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_did_you_mean_suggests_close_names_only() -> None:
    assert did_you_mean("adamww", ["adam", "adamw", "sgd"]) == "; did you mean 'adamw' or 'adam'?"
    assert did_you_mean("xyz", ["adam", "sgd"]) == ""
    assert did_you_mean(3, [3, 4]) == "; did you mean '3'?"  # non-strings are compared as strings


def test_atomic_writes_create_parents_and_replace(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "file.bin"
    assert atomic_write_bytes(target, b"one") == target
    assert target.read_bytes() == b"one"
    atomic_write_text(target, "zwei \u00fc")
    assert target.read_bytes() == "zwei \u00fc".encode()
    assert _leftovers(target.parent) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"complete old checkpoint")
    with pytest.raises(RuntimeError, match="killed"), atomic_open(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"complete old checkpoint"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_file_gets_the_permissions_of_a_plain_open(tmp_path: Path, umask: int, expected: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "x", b"")
        assert os.umask(umask) == umask  # the umask is left as it was
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == expected


def test_atomic_open_refuses_append_and_read_modes(tmp_path: Path) -> None:
    for mode in ("ab", "r", "r+b"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_open(tmp_path / "x", mode):
            pass
    assert not (tmp_path / "x").exists()


def test_write_json_format_and_tensor_conversion(tmp_path: Path) -> None:
    data = {"b": 1, "a": [1.5, None]}
    write_json(tmp_path / "m.json", data)
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    # interpzoo.io.write_json converts tensors first, then writes the same format through utils
    write_json_plain(tmp_path / "t.json", {"acc": torch.tensor(0.5), "v": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "t.json").read_text()) == {"acc": 0.5, "v": [1, 2]}
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _leftovers(tmp_path) == []


def test_atomic_torch_save_round_trips(tmp_path: Path) -> None:
    state = {"w": torch.arange(6.0).view(2, 3), "epoch": 3}
    atomic_torch_save(state, tmp_path / "c" / "last.ckpt")
    back = torch.load(tmp_path / "c" / "last.ckpt", weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    assert _leftovers(tmp_path / "c") == []


def test_utils_imports_only_the_standard_library() -> None:
    import ast

    tree = ast.parse(Path(utils.__file__).read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    import sys

    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots
