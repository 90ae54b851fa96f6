"""The README's code runs as written (issue 21, item 4): every ```python block, in order, in
one namespace, and every ``zinbgrad`` line of its ```bash blocks (not the set-up commands,
which CI runs itself, nor the multi-machine torchrun example)."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the genes the half split leaves without counts
        for block in blocks * 2:  # twice: a second run must work too (save overwrites)
            exec(compile(block, str(README), "exec"), ns)
    model, new = ns["model"], ns["new_adata"]
    # what the README says about them holds
    assert ns["W_new"].shape == (new.n_obs, 2)
    per_cell = model.score_samples(new)
    assert per_cell.shape == (new.n_obs,)
    assert model.score(new) == pytest.approx(per_cell.mean(), rel=1e-12)
    assert (tmp_path / "model.npz").exists()
    assert "X_zinbwave" in new.obsm and len(ns["de"]) > 0


def test_readme_command_lines_run(tmp_path, monkeypatch, capsys):
    from zinbgrad.cli import main

    lines = [
        ln.strip()
        for block in _blocks("bash")
        for ln in block.splitlines()
        if ln.strip().startswith("zinbgrad ")
    ]
    assert any(ln.startswith("zinbgrad fit") for ln in lines)
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ln in lines:
            assert main(shlex.split(ln)[1:]) == 0, ln
    capsys.readouterr()
    assert (tmp_path / "projected.h5ad").exists()
