"""The optimizer's explicit data (issue 16): one solver rule, the phase bookkeeping, and the
optimizer state that checkpoints save."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zinbgrad.optim.solvers import STOCHASTIC_MIN_CELLS, resolve_solver  # noqa: E402
from zinbgrad.optim.state import FitProgress, OptimizerState, stalled  # noqa: E402


def _estimator_rule(solver: str, n: int, m: int) -> str:
    """The estimator's rule before issue 16 (sketch when the sketch is smaller than n)."""
    if solver == "auto":
        return "sketch" if m < n else "full"
    if solver == "sketch" and m >= n:
        return "full"
    return solver


def _engine_rule(solver: str, n: int) -> str:
    """Engine.fit's rule before issue 16 (stochastic above 20,000 cells)."""
    if solver == "auto":
        return "full" if n <= 20000 else "stochastic"
    return solver


def test_resolve_solver_keeps_both_former_rules():
    sizes = (10, 19_999, 20_000, 20_001, 50_000, 10**6)
    for solver, n, m in itertools.product(("auto", "full", "stochastic", "sketch"), sizes, sizes):
        assert resolve_solver(solver, n, m) == _estimator_rule(solver, n, m)
    for solver, n in itertools.product(("auto", "full", "stochastic", "sketch"), sizes):
        assert resolve_solver(solver, n) == _engine_rule(solver, n)
    assert resolve_solver("auto", STOCHASTIC_MIN_CELLS + 1) == "stochastic"
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        resolve_solver("newton", 100, 50)


def test_fit_progress_equals_the_scans_of_the_history():
    """Counted as epochs are recorded, the progress answers what the solvers used to find by
    scanning the history: epochs per phase, the last epoch outside the sketch, and whether a
    resumed fit had converged already."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_sketch, n_sto = rng.integers(0, 4), rng.integers(0, 4)
        phases = ["sketch"] * n_sketch + ["stochastic"] * n_sto
        phases += (["extend"] if n_sketch and rng.random() < 0.7 else []) + ["full"] * int(
            rng.integers(0, 4)
        )
        objs = -1000.0 + rng.choice([0.0, 1e-6, 1.0], size=len(phases)).cumsum()
        history = [{"phase": p, "objective": float(o)} for p, o in zip(phases, objs, strict=True)]
        prog = FitProgress()
        for rec in history:
            prog.add(rec)
        assert prog == FitProgress.from_history(history)
        own = [h for h in history if h["phase"] != "sketch"]
        assert prog.own == len(own) and prog.total == len(history)
        for phase in ("sketch", "stochastic", "extend", "full"):
            assert prog.count(phase) == sum(h["phase"] == phase for h in history)
        if own:
            assert prog.recent[-1] == own[-1]["objective"]
        expect = (
            len(own) >= 2
            and own[-1]["phase"] == "full"
            and stalled(own[-2]["objective"], own[-1]["objective"], 1e-4)
        )
        assert prog.converged(1e-4) == expect


def test_optimizer_state_dict_round_trips():
    """What a checkpoint saves of the state is restored exactly, into another state."""
    from zinbgrad.model.params import Design, Params
    from zinbgrad.optim.path import FitPath
    from zinbgrad.optim.state import Proposal

    f64 = torch.float64
    g = torch.Generator().manual_seed(0)
    n, J, K = 7, 5, 2
    design = Design(*[torch.ones(r, 1, dtype=f64) for r in (n, n, J, J)])

    def params():
        p = Params.zeros(design, K)
        for k in ("W", "beta_mu", "alpha_mu", "zeta"):
            setattr(p, k, torch.randn(getattr(p, k).shape, generator=g, dtype=f64))
        return p

    st = OptimizerState.initial(params(), n, J, seed=3)
    st.rng.random(5)  # a generator that moved
    st.lam_genes = torch.rand(J, generator=g, dtype=f64)
    st.sto_H, st.sto_lam, st.sto_t = torch.rand(J, 3, 3, dtype=f64), torch.rand(J), 4
    st.zeta_quiet, st.zeta_skip, st.zeta_pause, st.gene_rejected = 1, 2, 8, 0.25
    v = torch.randn(J, 4, generator=g, dtype=f64)
    st.proposal = Proposal(v, v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[0, 0])
    st.trajectory = FitPath()
    st.trajectory.start(st.params)
    st.trajectory.record(st.params, torch.eye(K, dtype=f64), 2)
    arrays, meta = st.state_dict()
    history = [{"phase": "full", "objective": -1.0}]
    other = OptimizerState.initial(params(), n, J, seed=0)
    other.load_state_dict(arrays, {**meta, "history": history})
    back, meta_back = other.state_dict()
    assert meta_back == meta and sorted(back) == sorted(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(back[k], a, err_msg=k)
    assert other.rng.random() == st.rng.random()
    assert other.progress == FitProgress.from_history(history)
