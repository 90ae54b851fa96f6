"""Run the benchmark suite: ``python benchmarks/run.py [--quick] --out benchmarks/results``.

Every method runs on the same datasets, subsamples and splits in the same run, each job in
its own subprocess (peak memory and CPU time per method). See ``BENCHMARKS.md`` for the
results and ``python benchmarks/run.py --help`` for the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
