"""The command line: fit and demo write new files atomically and never touch the input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import zinbgrad
from zinbgrad.cli import main


@pytest.fixture()
def h5(tmp_path):
    path = tmp_path / "in.h5ad"
    zinbgrad.datasets.pbmc_small().write_h5ad(path)
    return path


def test_fit_writes_a_new_file(tmp_path, h5, capsys):
    before = h5.read_bytes()
    out = tmp_path / "out.h5ad"
    assert (
        main(
            [
                "fit",
                str(h5),
                "-o",
                str(out),
                "-k",
                "2",
                "-q",
                "--save-model",
                str(tmp_path / "m.npz"),
            ]
        )
        == 0
    )
    assert h5.read_bytes() == before
    res = ad.read_h5ad(out)
    assert res.obsm["X_zinbwave"].shape == (80, 2)
    assert "log-likelihood" in capsys.readouterr().out
    assert (tmp_path / "m.npz").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_fit_refuses_to_overwrite(tmp_path, h5):
    with pytest.raises(SystemExit, match="is the input"):
        main(["fit", str(h5), "-o", str(h5), "-q"])
    out = tmp_path / "exists.h5ad"
    out.write_text("x")
    with pytest.raises(SystemExit, match="exists"):
        main(["fit", str(h5), "-o", str(out), "-q"])
    assert out.read_text() == "x"


def test_fit_reports_unreadable_and_bad_input(tmp_path, h5):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(SystemExit, match="cannot read"):
        main(["fit", str(bad), "-o", str(tmp_path / "o.h5ad"), "-q"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad"), "-q"])
    with pytest.raises(SystemExit, match="nope"):
        main(["fit", str(h5), "-o", str(tmp_path / "o.h5ad"), "-q", "--batch-key", "nope"])
    assert not (tmp_path / "o.h5ad").exists()


def test_demo(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "pbmc_small_zinbwave.png").stat().st_size > 1000
    res = ad.read_h5ad(tmp_path / "demo" / "pbmc_small_zinbwave.h5ad")
    assert np.isfinite(res.obsm["X_zinbwave"]).all()
