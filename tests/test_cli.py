"""The command line: fit and demo write new files atomically and never touch the input."""

from __future__ import annotations

import os
import stat

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


def _model_file(tmp_path, h5):
    m = tmp_path / "m.npz"
    assert main(["fit", str(h5), "-o", str(tmp_path / "fit.h5ad"), "-k", "2", "-q",
                 "--save-model", str(m)]) == 0  # fmt: skip
    return m


def test_bad_outputs_are_refused_before_any_work(tmp_path, h5, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the fit ran although its output cannot be written")

    monkeypatch.setattr("zinbgrad.cli.fit._fit_and_write", never)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "m.npz").write_text("x")
    cases = [
        (["-o", str(tmp_path / "adir")], "is a directory"),
        (["-o", str(tmp_path / "afile" / "out.h5ad")], "is not a directory"),
        (["-o", str(tmp_path / "o.h5ad"), "--save-model", str(tmp_path / "m")], "m.npz exists"),
        (["-o", str(tmp_path / "o.h5ad"), "--nproc", "0"], "--nproc must be at least 1"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match):
            main(["fit", str(h5), "-q", *extra])
    with pytest.raises(SystemExit, match="is a file"):
        main(["demo", "-o", str(tmp_path / "afile")])
    assert (tmp_path / "m.npz").read_text() == "x" and not (tmp_path / "o.h5ad").exists()


def test_saved_files_follow_the_umask(tmp_path, h5):
    old = os.umask(0o022)
    try:
        out, ck = tmp_path / "o.h5ad", tmp_path / "ck.npz"
        assert main(["fit", str(h5), "-o", str(out), "-k", "2", "-q", "--save-model",
                     str(tmp_path / "m.npz"), "--checkpoint", str(ck)]) == 0  # fmt: skip
    finally:
        os.umask(old)
    for f in (out, ck, tmp_path / "m.npz"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_streamed_outputs_check_the_counts(tmp_path, h5):
    m = _model_file(tmp_path, h5)
    a = ad.read_h5ad(h5)
    a.X = a.X.copy()
    a.X.data[0] = -3
    neg = tmp_path / "neg.h5ad"
    a.write_h5ad(neg)
    for cmd in ("weights", "residuals"):
        out = tmp_path / f"{cmd}.h5ad"
        with pytest.raises(SystemExit, match="negative"):
            main([cmd, str(neg), "-o", str(out), "--model", str(m), "--stream"])
        assert not out.exists()


def test_non_integer_counts_flag(tmp_path, h5):
    a = ad.read_h5ad(h5)
    a.X = a.X.astype(np.float64)
    a.X.data[:5] += 0.5
    frac = tmp_path / "frac.h5ad"
    a.write_h5ad(frac)
    out = tmp_path / "o.h5ad"
    with pytest.raises(SystemExit, match="--allow-non-integer"):
        main(["fit", str(frac), "-o", str(out), "-k", "2", "-q"])
    with pytest.warns(UserWarning, match="non-integer"):
        assert main(["fit", str(frac), "-o", str(out), "-k", "2", "-q",
                     "--allow-non-integer"]) == 0  # fmt: skip
    assert ad.read_h5ad(out).uns["X_zinbwave"]["converged"]


def test_interrupt_exits_130_without_a_traceback(tmp_path, h5, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("zinbgrad.cli.fit._fit_and_write", interrupted)
    assert main(["fit", str(h5), "-o", str(tmp_path / "o.h5ad"), "-q"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_failing_rank_of_nproc_is_one_clean_error(tmp_path, h5, capfd):
    # the ranks' own error, once: not one copy per rank, torch's SIGTERM warning or a
    # "process 1 terminated with exit code 1"
    with pytest.raises(SystemExit) as exc:
        main(["fit", str(h5), "-o", str(tmp_path / "o.h5ad"), "-q", "--nproc", "2",
              "--batch-key", "nope"])  # fmt: skip
    assert str(exc.value.code).startswith("error: 'nope' not found in adata.obs (available:")
    assert "\n" not in str(exc.value.code)
    err = capfd.readouterr().err
    assert "nope" not in err and "SIGTERM" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


def test_help_shows_defaults_and_demo_has_a_description(capsys):
    for argv, expected in (
        (["fit", "--help"], "(default: 10)"),
        (["demo", "--help"], "pbmc_small"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert expected in capsys.readouterr().out


def test_outputs_keep_the_inputs_compression(tmp_path, capsys):
    import h5py

    a = zinbgrad.datasets.pbmc_small()
    a.obs["depth"] = np.log(np.asarray(a.X.sum(1)).ravel())
    src = tmp_path / "gz.h5ad"
    a.write_h5ad(src, compression="gzip")
    out = tmp_path / "fit.h5ad"
    argv = ["fit", str(src), "-o", str(out), "-k", "2", "-q", "--batch-key", "batch"]
    assert main([*argv, "--covariate-keys", "depth"]) == 0
    with h5py.File(out, "r") as f:
        assert f["X/data"].compression == "gzip"
    res = ad.read_h5ad(out)
    assert list(res.uns["X_zinbwave"]["X_columns"]) == ["intercept", "batch[g2]", "depth"]
    norm = tmp_path / "norm.h5ad"
    assert main(["normalize", str(out), "-o", str(norm)]) == 0
    with h5py.File(norm, "r") as f:
        assert f["X/data"].compression == "gzip"
    capsys.readouterr()


def test_demo_title_stays_inside_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    from zinbgrad.cli import demo_figure

    a = zinbgrad.datasets.pbmc_small()
    a.obsm["X_zinbwave"] = np.random.default_rng(0).normal(size=(a.n_obs, 2))
    fig = demo_figure(a)
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent()
    W, H = fig.bbox.width, fig.bbox.height
    assert box.x0 >= 0 and box.x1 <= W and box.y1 <= H
    # with room for wider fonts than this machine's: the old one-line title took 91 % of the
    # width here (453 of 500 px), close to the edge
    assert box.width <= 0.75 * W


def _fitted_arrays(model) -> dict:
    names = ("W_", "beta_mu_", "beta_pi_", "alpha_mu_", "alpha_pi_", "zeta_")
    names += ("delta_mu_", "zeta_batch_")
    return {n: getattr(model, n) for n in names if getattr(model, n, None) is not None}


@pytest.mark.parametrize(
    ("flags", "keywords", "batch_part"),
    [
        (["--batch-loadings", "--epsilon-delta", "5"],
         dict(batch_loadings=True, epsilon_delta=5.0), "delta_mu_"),
        (["--genewise-dispersion", "--batch-dispersion", "--epsilon-alpha-pi", "3"],
         dict(common_dispersion=False, batch_dispersion=True, epsilon_alpha_pi=3.0),
         "zeta_batch_"),
    ],
)  # fmt: skip
def test_fit_batch_options_match_the_api(tmp_path, h5, flags, keywords, batch_part):
    out, saved = tmp_path / "o.h5ad", tmp_path / "m.npz"
    argv = ["fit", str(h5), "-o", str(out), "-k", "2", "-q", "--batch-key", "batch"]
    assert main([*argv, *flags, "--save-model", str(saved)]) == 0
    api = zinbgrad.ZINBWaVE(n_components=2, verbose=False, **keywords)
    api.fit(ad.read_h5ad(h5), batch_key="batch")
    cli = zinbgrad.ZINBWaVE.load(saved)
    for name in ("batch_loadings", "batch_dispersion"):
        assert getattr(cli, name) == keywords.get(name, False)
    for name in ("epsilon_delta", "epsilon_alpha_pi"):
        if name in keywords:
            assert cli.penalty_params_[name] == keywords[name]
    arrays = _fitted_arrays(api)
    assert batch_part in arrays and np.abs(arrays[batch_part]).max() > 0
    assert arrays.keys() == _fitted_arrays(cli).keys()
    for name, value in arrays.items():
        np.testing.assert_allclose(getattr(cli, name), value, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ad.read_h5ad(out).obsm["X_zinbwave"], api.W_, rtol=1e-10)


def test_batch_options_need_their_prerequisites_before_any_work(tmp_path, h5, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the data were read although the options are incomplete")

    monkeypatch.setattr("zinbgrad.cli.fit._fit_and_write", never)
    argv = ["fit", str(h5), "-o", str(tmp_path / "o.h5ad"), "-q"]
    cases = [
        (["--batch-dispersion", "--genewise-dispersion"], "--batch-dispersion needs --batch-key"),
        (["--batch-loadings"], "--batch-loadings needs --batch-key"),
        (["--batch-dispersion", "--batch-key", "batch"], "needs --genewise-dispersion"),
    ]
    for extra, match in cases:
        with pytest.raises(SystemExit, match=match) as exc:
            main([*argv, *extra])
        assert str(exc.value.code).startswith("error: ") and "\n" not in str(exc.value.code)
    assert not (tmp_path / "o.h5ad").exists()


def test_project_new_batches_maps_an_unseen_batch(tmp_path, capsys):
    a = zinbgrad.datasets.pbmc_small()
    a.obs["site"] = np.where(np.arange(a.n_obs) % 4 == 0, "s3", a.obs["batch"].astype(str))
    ref, query = a[a.obs["site"] != "s3"].copy(), a[a.obs["site"] == "s3"].copy()
    ref_h5, query_h5 = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    ref.write_h5ad(ref_h5)
    query.write_h5ad(query_h5)
    fitted = tmp_path / "fit.h5ad"
    assert main(["fit", str(ref_h5), "-o", str(fitted), "-k", "2", "-q", "--batch-key", "site",
                 "--batch-loadings"]) == 0  # fmt: skip
    out = tmp_path / "proj.h5ad"
    argv = ["project", str(query_h5), "--model", str(fitted), "-o", str(out)]
    with pytest.raises(SystemExit, match="s3"):  # an unseen level, without the option
        main(argv)
    assert main([*argv, "--new-batches"]) == 0
    api = zinbgrad.ZINBWaVE(n_components=2, verbose=False, batch_loadings=True)
    api.fit(ref, batch_key="site")
    expected = api.transform(query, new_batches=True)
    W = ad.read_h5ad(out).obsm["X_zinbwave"]
    assert W.shape == (query.n_obs, 2) and np.isfinite(W).all()
    np.testing.assert_allclose(W, expected, rtol=1e-8, atol=1e-10)
    capsys.readouterr()
