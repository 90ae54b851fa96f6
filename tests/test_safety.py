"""Data safety and clear errors (issue 22): outputs that cannot destroy what the user owns,
interruptions that leave nothing behind, and one quality of message on every path.

Each test pins a hole found by feeding hostile inputs to the API and the command line; the
last one feeds a table of them and checks every outcome the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import zinbgrad
from zinbgrad import ZINBWaVE, tl
from zinbgrad.cli import main
from zinbgrad.io_utils import TEMP_MARK, atomic_write, remove_stale_temps, stale_temps
from zinbgrad.simulate import make_synthetic, zinb_sim

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def pbmc():
    return zinbgrad.datasets.pbmc_small()


@pytest.fixture(scope="module")
def model(pbmc):
    return ZINBWaVE(2, max_epochs=3, verbose=False).fit(pbmc)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pbmc, model):
    """A folder with counts, the counts with a stored model, and the model as .npz."""
    d = tmp_path_factory.mktemp("files")
    pbmc.write_h5ad(d / "counts.h5ad")
    fitted = pbmc.copy()
    tl._zinbwave.store_model(fitted, model)
    fitted.write_h5ad(d / "fitted.h5ad")
    model.save(d / "model.npz")
    return d


def _digest(folder: Path) -> dict[str, str]:
    """Every file of ``folder`` (hidden ones included) and its content's hash."""
    return {
        p.name: hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _tamper(src: Path, dst: Path, **changes) -> Path:
    z = dict(np.load(src, allow_pickle=False))
    meta = json.loads(str(z["metadata"]))
    for k, v in changes.items():
        if k == "meta":
            v(meta)
        else:
            z[k] = v
    z["metadata"] = np.array(json.dumps(meta))
    np.savez(dst, **z)
    return dst


# ----------------------------------------------------------------------------- data safety
def test_output_equal_to_the_model_file_is_refused(files, tmp_path):
    before = _digest(files)
    with pytest.raises(SystemExit, match="is the --model file"):
        main(["project", str(files / "counts.h5ad"), "--model", str(files / "model.npz"),
              "-o", str(files / "model.npz"), "--force"])  # fmt: skip
    with pytest.raises(SystemExit, match="is the --model file"):
        main(["normalize", str(files / "counts.h5ad"), "--model", str(files / "fitted.h5ad"),
              "-o", str(files / "fitted.h5ad"), "--force"])  # fmt: skip
    link = tmp_path / "link.npz"  # the same file under another name
    link.symlink_to(files / "model.npz")
    with pytest.raises(SystemExit, match="is the --model file"):
        main(["simulate", str(files / "fitted.h5ad"), "--model", str(link),
              "-o", str(files / "model.npz"), "--force"])  # fmt: skip
    assert _digest(files) == before


def test_outputs_that_are_not_regular_files_are_refused(files, tmp_path):
    # a pipe of our own stands for devices: a regression must not replace /dev/null or
    # /dev/full of the machine running the tests (as root it would)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out in (str(fifo),):
        with pytest.raises(SystemExit, match="not a regular file"):
            main(["fit", str(files / "counts.h5ad"), "-o", out, "--force", "-q"])
        with pytest.raises(ValueError, match="not a regular file"):
            with atomic_write(out):
                pass
    assert fifo.exists() and not fifo.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    # the demo replaces its own files, but not one of them that is a pipe: refused up front
    demo = tmp_path / "demo"
    demo.mkdir()
    os.mkfifo(demo / "pbmc_small_zinbwave.png")
    with pytest.raises(SystemExit, match="not a regular file"):
        main(["demo", "-o", str(demo)])
    assert sorted(p.name for p in demo.iterdir()) == ["pbmc_small_zinbwave.png"]


@pytest.mark.parametrize("key", ["", "a/b", ".", 3])
def test_keys_are_checked_before_any_work(pbmc, model, files, tmp_path, monkeypatch, key):
    def no_work(*args, **kwargs):
        raise AssertionError("the key must be refused before any work")

    monkeypatch.setattr(ZINBWaVE, "fit", no_work)
    a = pbmc.copy()
    with pytest.raises((TypeError, ValueError), match="key_added"):
        tl.zinbwave(a, 2, key_added=key)
    for fn in (tl.normalize, tl.observational_weights, tl.batch_corrected):
        with pytest.raises((TypeError, ValueError), match="key_added"):
            fn(a, model=model, key_added=key)
    with pytest.raises((TypeError, ValueError), match="key_added"):
        tl._zinbwave.store_model(a, model, key)
    assert not a.layers and not a.obsm and set(a.uns) == set(pbmc.uns)
    if isinstance(key, str):
        monkeypatch.setattr("zinbgrad.cli.fit._fit_and_write", no_work)
        out = ["-o", str(tmp_path / "o.h5ad"), f"--key-added={key}"]
        for argv in (
            ["fit", str(files / "counts.h5ad"), *out, "-q"],
            ["normalize", str(files / "fitted.h5ad"), *out],
        ):
            with pytest.raises(SystemExit, match="--key-added"):
                main(argv)
    assert not list(tmp_path.iterdir())


def test_atomic_write_names_cleans_and_publishes(tmp_path):
    out = tmp_path / "out.h5ad"
    with pytest.raises(RuntimeError):
        with atomic_write(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.h5ad" + TEMP_MARK)
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert not list(tmp_path.iterdir())
    with atomic_write(out) as tmp:
        tmp.write_text("whole")
    assert out.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_stale_temp_files_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    out = tmp_path / "ck.npz"
    with atomic_write(out) as tmp:  # this process's name, to derive the others from
        mine = tmp.name
    host, pid = mine[len(".ck.npz" + TEMP_MARK) :].split("-")[:2]
    stale = tmp_path / f".ck.npz{TEMP_MARK}{host}-{dead.stdout.strip()}-abc123"
    live = tmp_path / f".ck.npz{TEMP_MARK}{host}-{os.getppid()}-abc123"  # pytest's parent
    other_host = tmp_path / f".ck.npz{TEMP_MARK}ffffff-{dead.stdout.strip()}-abc123"
    other_out = tmp_path / f".other.npz{TEMP_MARK}{host}-{dead.stdout.strip()}-abc123"
    for p in (stale, live, other_host, other_out):
        p.write_bytes(b"x" * 100)
    assert stale_temps(out) == [stale]
    with atomic_write(out) as tmp:
        tmp.write_text("new")
    assert not stale.exists() and live.exists() and other_host.exists() and other_out.exists()
    assert remove_stale_temps(out) == []


def test_sigterm_during_the_write_leaves_nothing(tmp_path, files):
    """SIGTERM (kill, SLURM) is handled like Ctrl-C: rc 143, a message, no temporary file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.h5ad").write_bytes((files / "counts.h5ad").read_bytes())
    script = textwrap.dedent(
        """
        import os, signal, sys, anndata
        from zinbgrad.cli import main
        real = anndata.AnnData.write_h5ad
        def killed_midway(self, path, *a, **k):
            real(self, path, *a, **k)  # the temporary file is written whole, then:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        anndata.AnnData.write_h5ad = killed_midway
        sys.exit(main(["fit", "in.h5ad", "-o", "out.h5ad", "-k", "2", "--epochs", "1", "-q"]))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 143, res.stderr
    assert "zinbgrad: terminated" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in work.iterdir()) == ["in.h5ad"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo and signals as on Linux")
def test_sigterm_under_nproc_ends_every_rank_and_leaves_complete_checkpoints(tmp_path, files):
    """SIGTERM to ``zinbgrad fit --nproc 2`` while its ranks checkpoint every epoch: the ranks
    are ended the same way (no waiting for the fit to finish), the command says so in one
    line, and only complete checkpoints remain, no temporary file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "in.h5ad").write_bytes((files / "counts.h5ad").read_bytes())
    cmd = [sys.executable, "-m", "zinbgrad.cli", "fit", "in.h5ad", "-o", "out.h5ad", "-k", "2",
           "--nproc", "2", "--epochs", "100000", "--tol", "0", "--checkpoint", "ck.npz",
           "-q"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / "ck.rank1.npz").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip() == "zinbgrad: terminated"
    assert sorted(p.name for p in work.iterdir()) == ["ck.rank0.npz", "ck.rank1.npz", "in.h5ad"]
    for r in (0, 1):
        with np.load(work / f"ck.rank{r}.npz") as z:
            assert json.loads(str(z["metadata"]))["rank"] == r


def test_resume_refuses_other_counts(pbmc, tmp_path):
    ck = tmp_path / "ck.npz"
    ZINBWaVE(2, max_epochs=2, verbose=False).fit(pbmc, checkpoint=ck)
    doubled = pbmc.copy()
    doubled.X = doubled.X * 2
    with pytest.raises(ValueError, match="other counts"):
        ZINBWaVE(2, max_epochs=3, verbose=False).fit(doubled, resume=ck)
    path = tmp_path / "doubled.h5ad"
    doubled.X = sp.csr_matrix(doubled.X)
    doubled.write_h5ad(path)
    with pytest.raises(ValueError, match="other counts"):  # streamed: the same fingerprint
        ZINBWaVE(2, max_epochs=3, verbose=False).fit(str(path), resume=ck)
    resumed = ZINBWaVE(2, max_epochs=3, verbose=False).fit(pbmc, resume=ck)
    assert resumed.n_iter_ == 3


def test_a_model_runs_on_any_machine(model, pbmc, tmp_path):
    """The device is chosen where the model is used: one saved from a GPU fit (its file
    edited to say so here) loads and projects on a CPU-only machine."""
    gpu = _tamper(
        model.save(tmp_path / "m.npz"),
        tmp_path / "gpu.npz",
        meta=lambda m: m["hyperparameters"].update(device="cuda:0"),
    )
    loaded = ZINBWaVE.load(gpu)
    assert loaded.device == "auto"
    assert ZINBWaVE.load(gpu, device="cpu").device == "cpu"
    W = loaded.transform(pbmc[:10], device="cpu")
    np.testing.assert_allclose(W, model.transform(pbmc[:10]))
    a = pbmc.copy()
    tl._zinbwave.store_model(a, model)
    assert "device" not in json.loads(a.uns["X_zinbwave"]["params"])
    a.uns["X_zinbwave"]["params"] = json.dumps({**model.get_params(), "device": "cuda:0"})
    stored = tl.model_from_anndata(a)
    np.testing.assert_allclose(stored.transform(pbmc[:10]), W)
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            ZINBWaVE.load(gpu, device="cuda")


def test_checkpoint_and_resume_are_checked_before_any_work(pbmc, files, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("must be refused before any work")

    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setattr("zinbgrad.estimator.open_counts", no_work)
    with pytest.raises(ValueError, match="not a directory"):
        ZINBWaVE(2).fit(pbmc, checkpoint=afile / "ck.npz")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ZINBWaVE(2).fit(pbmc, resume=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="not a zinbgrad checkpoint"):
        ZINBWaVE(2).fit(pbmc, resume=files / "model.npz")  # a model, not a checkpoint
    monkeypatch.setattr("zinbgrad.cli.fit._fit_and_write", no_work)
    inp = str(files / "counts.h5ad")
    out = str(tmp_path / "o.h5ad")
    for extra, match in (
        (["--checkpoint", str(afile / "ck.npz")], "not a directory"),
        (["--checkpoint", "/proc/zinbgrad/ck.npz"], "cannot write checkpoint"),
        (["--resume", str(tmp_path / "missing.npz")], "nothing to resume"),
        (
            [
                "--checkpoint",
                inp.replace(".h5ad", ".npz"),
                "--save-model",
                inp.replace(".h5ad", ".npz"),
            ],
            "is the --save-model file",
        ),  # fmt: skip
        (
            ["--checkpoint", str(tmp_path / "ck.npz"), "--checkpoint-every", "0"],
            "checkpoint_every must be a positive integer",
        ),  # fmt: skip
    ):
        with pytest.raises(SystemExit, match=match):
            main(["fit", inp, "-o", out, "-q", *extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ----------------------------------------------------------------------------- silent acceptance
def test_checkpoint_and_model_paths_are_not_rewritten(pbmc, model, tmp_path):
    for bad, match in (
        (tmp_path / "x.h5ad", "must be a .npz file"),
        (tmp_path, "is a directory"),
        (str(tmp_path / "new") + os.sep, "is a directory"),
    ):
        with pytest.raises(ValueError, match=match):
            ZINBWaVE(2, max_epochs=1, verbose=False).fit(pbmc, checkpoint=bad)
        with pytest.raises(ValueError, match=match):
            model.save(bad)
    for every in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
            ZINBWaVE(2).fit(pbmc, checkpoint=tmp_path / "ck.npz", checkpoint_every=every)
    assert not list(tmp_path.iterdir())
    assert model.save(tmp_path / "noext") == tmp_path / "noext.npz"
    np.testing.assert_array_equal(ZINBWaVE.load(tmp_path / "noext").W_, model.W_)


def test_layers_are_float32_or_float64(pbmc, model):
    a = pbmc.copy()
    for dtype in (np.int32, np.float16, "int64", bool):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            tl.normalize(a, model=model, dtype=dtype)
    assert not a.layers


def test_fit_refuses_duplicate_names_and_boolean_counts(pbmc):
    a = pbmc.copy()
    a.var_names = ["g0", "g0", *a.var_names[2:]]
    with pytest.raises(ValueError, match="1 gene names occur more than once.*var_names_make"):
        ZINBWaVE(2).fit(a)
    b = pbmc.copy()
    b.obs_names = ["c", *b.obs_names[1:-1], "c"]
    with pytest.raises(ValueError, match="cell names occur more than once"):
        ZINBWaVE(2).fit(b)
    c = pbmc.copy()
    c.X = sp.csr_matrix(c.X) > 0
    with pytest.raises(ValueError, match="boolean"):
        ZINBWaVE(2).fit(c)


# ----------------------------------------------------------------------------- messages
def test_a_model_stored_in_an_anndata_is_validated(pbmc, model):
    W = model.W_.copy()

    def stored():
        a = pbmc.copy()
        tl._zinbwave.store_model(a, model)
        return a

    cases = []
    a = stored()
    a.obsm["X_zinbwave"] = a.obsm["X_zinbwave"][:, :1]
    cases.append((a, "W has shape"))
    a = stored()
    a.uns["X_zinbwave"]["params"] = "{not json"
    cases.append((a, "no valid zinbgrad model"))
    a = stored()
    del a.varm["X_zinbwave_alpha_mu"]
    cases.append((a, r"adata.varm\['X_zinbwave_alpha_mu'\] is missing"))
    a = stored()
    a.obsm["X_zinbwave"][0, 0] = np.nan
    cases.append((a, "W has NaN"))
    for a, match in cases:
        with pytest.raises(ValueError, match=match):
            tl.model_from_anndata(a)
        with pytest.raises(ValueError, match=match):
            tl.normalize(a)
        assert "zinbwave_normalized" not in a.layers
    # the AnnData holds copies: editing it never changed the model, nor the model it
    np.testing.assert_array_equal(model.W_, W)
    a = stored()
    rebuilt = tl.model_from_anndata(a)
    rebuilt.W_[0, 0] = 1e6
    assert a.obsm["X_zinbwave"][0, 0] == W[0, 0]


def test_edited_model_files_are_named_precisely(model, tmp_path):
    good = model.save(tmp_path / "good.npz")
    path_zeta = np.load(good)["path_zeta"]
    for changes, match in (
        ({"path_alpha_mu": np.load(good)["path_alpha_mu"][..., :-1]}, "fit path's alpha_mu"),
        ({"path_zeta": path_zeta[:, :-1]}, "fit path's zeta"),
        ({"meta": lambda m: m.update(history="oops")}, "history must be a list"),
        ({"var_names": np.load(good)["var_names"][:-1]}, "var_names has shape"),
        ({"obs_names": np.load(good)["obs_names"][:-1]}, "obs_names has shape"),
    ):
        bad = _tamper(good, tmp_path / "bad.npz", **changes)
        with pytest.raises(ValueError, match=match):
            ZINBWaVE.load(bad)


def test_load_never_suggests_unpickling(tmp_path, files):
    text = tmp_path / "model.txt"
    text.write_text("not a model\n")
    pickled = tmp_path / "p.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for path, match in (
        (text, "not a .npz archive"),
        (files / "counts.h5ad", "HDF5 file"),
        (pickled, "not a .npz archive|no zinbgrad metadata"),
    ):
        with pytest.raises(ValueError, match=match) as exc:
            ZINBWaVE.load(path)
        assert "pickle" not in str(exc.value)


def test_parameters_are_named(pbmc, model, files, tmp_path):
    with pytest.raises(ValueError, match=r"random_state \(--seed"):
        ZINBWaVE(2, random_state=-1).fit(pbmc)
    with pytest.raises(SystemExit, match="--seed"):
        main(["fit", str(files / "counts.h5ad"), "-o", str(tmp_path / "o.h5ad"), "--seed", "-1",
              "-q"])  # fmt: skip
    with pytest.raises(TypeError, match="adata must be an AnnData, got ndarray"):
        tl.differential_expression(np.ones((3, 3)), "x")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            tl.normalize(pbmc.copy(), model=model, device="cuda")
    with pytest.raises(ValueError, match="batch_effect must be a finite number"):
        make_synthetic(model, 10, batch_effect=float("nan"))
    huge = ZINBWaVE.from_params(
        W=np.zeros((4, 1)), alpha_mu=np.zeros((1, 3)), beta_mu=np.full((1, 3), 25.0),
        gamma_mu=np.zeros((1, 4)), zeta=np.zeros(3), zero_inflation=False,
    )  # fmt: skip
    with pytest.raises(OverflowError, match="--count-dtype int64"):
        zinb_sim(huge, count_dtype="int32")
    assert not list(tmp_path.iterdir())


def test_design_messages_name_the_real_problem(pbmc):
    a = pbmc.copy()
    a.obs["dose"] = np.random.default_rng(0).normal(size=a.n_obs) * 1e17
    with pytest.raises(ValueError, match="column 'dose' of X .* scale") as exc:
        ZINBWaVE(2).fit(a, covariate_keys=["dose"])
    assert "rank deficient" not in str(exc.value)
    a.obs["dose"] = np.random.default_rng(0).normal(size=a.n_obs)
    with pytest.raises(ValueError, match="numeric column .* covariate_keys") as exc:
        ZINBWaVE(2).fit(a, batch_key="dose")
    assert len(str(exc.value)) < 300


def test_streamed_validation_says_what_in_memory_says(pbmc, tmp_path):
    X = sp.csr_matrix(pbmc.X, dtype=np.float64)
    neg = X.copy()
    neg.data[:3] = -1.0
    frac = X.copy()
    frac.data[:4] = 0.5
    nan = X.copy()
    nan.data[:2] = np.nan
    for M, match in (
        (neg, "contain 3 negative values"),
        (frac, r"contain 4 non-integer values \(e.g. 0.5\)"),
        (nan, "contain 2 NaN or infinite values"),
    ):
        a = ad.AnnData(M, obs=pbmc.obs[[]], var=pbmc.var[[]])
        a.write_h5ad(tmp_path / "a.h5ad")
        with pytest.raises(ValueError, match=match):
            ZINBWaVE(2).fit(a)
        with pytest.raises(ValueError, match=match):
            ZINBWaVE(2).fit(str(tmp_path / "a.h5ad"))
    empty = ad.AnnData(sp.csr_matrix((0, 5)))
    empty.write_h5ad(tmp_path / "e.h5ad")
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 5\)\)"):
        ZINBWaVE(2).fit(str(tmp_path / "e.h5ad"))
    a = ad.AnnData(X, layers={"counts": X, "spliced": X})
    a.write_h5ad(tmp_path / "l.h5ad")
    with pytest.raises(KeyError, match=r"layer 'raw' not found .*\['counts', 'spliced'\]"):
        ZINBWaVE(2).fit(str(tmp_path / "l.h5ad"), layer="raw")


# ----------------------------------------------------------------------------- fuzz table
def _api_cases(pbmc, model, d):
    """(name, call) pairs: each call must raise a clear zinbgrad error."""
    counts = str(d / "counts.h5ad")
    neg = pbmc.copy()
    neg.X = sp.csr_matrix(neg.X) * -1
    return [
        ("fit array of text", lambda: ZINBWaVE(2).fit(np.array([["a", "b"], ["c", "d"]]))),
        ("fit 1-D", lambda: ZINBWaVE(2).fit(np.ones(5))),
        ("fit negative", lambda: ZINBWaVE(2).fit(neg)),
        ("fit K too large", lambda: ZINBWaVE(500).fit(pbmc)),
        ("fit K negative", lambda: ZINBWaVE(-1).fit(pbmc)),
        ("fit tol nan", lambda: ZINBWaVE(2, tol=float("nan")).fit(pbmc)),
        ("fit unknown layer", lambda: ZINBWaVE(2).fit(pbmc, layer="nope")),
        ("fit unknown batch", lambda: ZINBWaVE(2).fit(pbmc, batch_key="nope")),
        ("fit bad device", lambda: ZINBWaVE(2, device="tpu").fit(pbmc)),
        ("fit missing file", lambda: ZINBWaVE(2).fit(str(d / "missing.h5ad"))),
        ("fit streamed bad layer", lambda: ZINBWaVE(2).fit(counts, layer="x")),
        ("fit checkpoint h5ad", lambda: ZINBWaVE(2).fit(pbmc, checkpoint=d / "c.h5ad")),
        (
            "fit checkpoint every 0",
            lambda: ZINBWaVE(2).fit(pbmc, checkpoint=d / "c", checkpoint_every=0),
        ),  # noqa: E501
        ("fit resume missing", lambda: ZINBWaVE(2).fit(pbmc, resume=d / "missing.npz")),
        ("fit random_state -1", lambda: ZINBWaVE(2, random_state=-1).fit(pbmc)),
        ("zinbwave key /", lambda: tl.zinbwave(pbmc, 2, key_added="a/b")),
        ("zinbwave not anndata", lambda: tl.zinbwave(np.ones((3, 3)), 2)),
        ("normalize int dtype", lambda: tl.normalize(pbmc, model=model, dtype=np.int32)),
        ("normalize no model", lambda: tl.normalize(pbmc)),
        ("normalize other cells", lambda: tl.normalize(pbmc[:10], model=model)),
        ("residuals bad kind", lambda: tl.residuals(pbmc, "nope", model=model)),
        ("project key empty", lambda: tl.project(pbmc, model, key_added="")),
        ("project missing genes", lambda: tl.project(pbmc[:, :10], model)),
        ("transform wrong columns", lambda: model.transform(np.ones((3, 4)))),
        ("transform bad device", lambda: model.transform(pbmc, device="cuda:99")),
        ("de not anndata", lambda: tl.differential_expression(np.ones((3, 3)), "x")),
        ("save into a folder", lambda: model.save(d)),
        ("save other extension", lambda: model.save(d / "m.h5ad")),
        ("save existing", lambda: model.save(d / "model.npz")),
        ("load h5ad", lambda: ZINBWaVE.load(counts)),
        ("load missing", lambda: ZINBWaVE.load(d / "missing.npz")),
        ("load on a missing GPU", lambda: ZINBWaVE.load(d / "model.npz", device="cuda:99")),
        (
            "synthetic nan batch effect",
            lambda: make_synthetic(model, 10, d / "s.h5ad", batch_effect=float("nan")),
        ),  # noqa: E501
        ("synthetic exists", lambda: make_synthetic(model, 10, d / "model.npz")),  # noqa: E501
    ]


def _cli_cases(d):
    """Argument lists: each must end in one ``error: ...`` line."""
    c, f, m, o = (str(d / n) for n in ("counts.h5ad", "fitted.h5ad", "model.npz", "o.h5ad"))
    return [
        ["fit", str(d / "missing.h5ad"), "-o", o],
        ["fit", c, "-o", c, "--force"],
        ["fit", c, "-o", str(d)],
        ["fit", c, "-o", o, "--key-added", ""],
        ["fit", c, "-o", o, "--key-added", "a/b"],
        ["fit", c, "-o", o, "--seed", "-1"],
        ["fit", c, "-o", o, "-k", "0", "--epochs", "0"],
        ["fit", c, "-o", o, "--batch-key", "nope"],
        ["fit", c, "-o", o, "--layer", "nope", "--stream"],
        ["fit", c, "-o", o, "--checkpoint", str(d / "ck.h5ad")],
        ["fit", c, "-o", o, "--checkpoint", str(d / "ck"), "--checkpoint-every", "-2"],
        ["fit", c, "-o", o, "--resume", str(d / "missing.npz")],
        ["fit", c, "-o", o, "--resume", c],
        ["fit", c, "-o", o, "--save-model", m],
        ["fit", c, "-o", o, "--save-model", str(d / "m.h5ad")],
        ["fit", c, "-o", o, "--device", "cuda:99"],
        ["normalize", c, "-o", o],
        ["normalize", f, "-o", o, "--key-added", ""],
        ["normalize", c, "--model", f, "-o", f, "--force"],
        ["normalize", c, "--model", str(d / "missing.npz"), "-o", o],
        ["normalize", c, "--model", c, "-o", o],
        ["residuals", f, "-o", o, "--stream", "--layer", "nope"],
        ["project", c, "--model", m, "-o", m, "--force"],
        ["project", c, "--model", str(d / "missing.npz"), "-o", o],
        ["project", c, "--model", m, "-o", o, "--key-added", "a/b"],
        ["simulate", f, "-o", o, "--n-cells", "10", "--batch-effect", "nan"],
        ["simulate", f, "-o", o, "--seed", "-1"],
        ["simulate", f, "-o", o, "--jitter", "1"],
        ["convert", c, c],
        ["convert", c, o],
    ]


def test_fuzz_bad_inputs_give_clear_errors_and_leave_everything_as_it_was(
    files, pbmc, model, capsys
):
    """A table of bad inputs through the API and the command line. Every outcome: a
    zinbgrad error with a one-line message (no traceback from inside, no numpy or torch
    wording), the inputs unchanged (objects and files), and no file or temporary file
    left in the folder."""
    before = _digest(files)
    X_before = pbmc.X.copy()
    model_W = model.W_.copy()
    clear = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, OverflowError)
    foreign = (
        "Traceback",
        "allow_pickle",
        "Torch not compiled",
        "size of tensor",
        "mat1 and mat2",
        "Expecting value",  # a raw JSONDecodeError
        "object has no attribute",
    )
    for name, call in _api_cases(pbmc, model, files):
        with pytest.raises(clear) as exc:
            call()
        msg = exc.value.args[0] if exc.value.args else ""
        assert isinstance(msg, str) and msg and "\n" not in msg, (name, msg)
        assert not any(f in msg for f in foreign), (name, msg)
    for argv in _cli_cases(files):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "-q"] if argv[0] == "fit" else argv)
        msg = exc.value.code
        assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, (argv, msg)
        assert not any(f in msg for f in foreign), (argv, msg)
        assert "Traceback" not in capsys.readouterr().err
    assert _digest(files) == before
    assert (pbmc.X != X_before).nnz == 0 if sp.issparse(X_before) else (pbmc.X == X_before).all()
    np.testing.assert_array_equal(model.W_, model_W)
    assert not [p for p in files.iterdir() if TEMP_MARK in p.name]
