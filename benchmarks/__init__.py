"""Benchmark suite: zinbgrad against scVI, R zinbwave (when installed) and a PCA baseline.

One command reproduces every table and figure of ``BENCHMARKS.md``::

    python benchmarks/run.py --out benchmarks/results          # full
    python benchmarks/run.py --quick --out benchmarks/results  # a few minutes

Modules
-------
datasets
    Loading, filtering and subsampling of the data in ``shared/data``.
methods
    One adapter per method with a common interface (fit, latent, train_nll, heldout_nll,
    impute).
tasks
    The benchmark tasks (likelihood + clustering, imputation, batch mixing, scaling), the
    profiles (tiny / quick / full) and the job runner (one subprocess per job).
report
    Tables (Markdown, CSV, JSON) and figures (PNG).
cli
    The command line (options, source snapshot, run metadata).
run
    The script entry point (``python benchmarks/run.py``).

Other scripts in this folder (``scaling.py``, ``roofline.py``, ...) are separate harnesses.
"""
