"""The OpenMP wait policy zinbgrad sets before torch loads libgomp (see zinbgrad.openmp)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import zinbgrad
from zinbgrad.openmp import prefer_passive_wait

SRC = str(Path(zinbgrad.__file__).resolve().parents[1])


def _policy_after(code: str, **env: str) -> str:
    """OMP_WAIT_POLICY as a fresh interpreter sees it after running ``code``."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base.update(env, PYTHONPATH=SRC)
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport os; print(os.environ.get('OMP_WAIT_POLICY'))"],
        capture_output=True,
        text=True,
        env=base,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("code", "env", "expected"),
    [
        ("import zinbgrad.cli", {}, "PASSIVE"),  # the package and the command set it first
        ("import torch, zinbgrad", {}, "None"),  # too late to take effect: left alone
        ("import zinbgrad", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),  # the user's choice
    ],
)
def test_import_sets_passive_wait_only_where_it_can_act(code, env, expected):
    assert _policy_after(code, **env) == expected


@pytest.mark.parametrize(
    ("env", "torch_imported", "expected"),
    [
        ({}, False, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({}, True, {}),
        ({"OMP_WAIT_POLICY": "active"}, False, {"OMP_WAIT_POLICY": "active"}),
        ({"GOMP_SPINCOUNT": "1000"}, False, {"GOMP_SPINCOUNT": "1000"}),
        ({"ZINBGRAD_OMP_PASSIVE": "0"}, False, {"ZINBGRAD_OMP_PASSIVE": "0"}),
    ],
)
def test_passive_wait_rules(env, torch_imported, expected):
    env = dict(env)
    changed = prefer_passive_wait(env, torch_imported=torch_imported)
    assert env == expected
    assert changed == ("OMP_WAIT_POLICY" in expected and expected["OMP_WAIT_POLICY"] == "PASSIVE")


def test_default_looks_at_this_process():
    env: dict[str, str] = {}
    assert "torch" in sys.modules  # the test session imported it
    assert prefer_passive_wait(env) is False and env == {}
