#!/usr/bin/env bash
# Wheels that a GPU machine of the `device` tool lacks, for its Python 3.12, into .whl/
# (git-ignored; ~16 MB). Its image has torch, triton, numpy, scipy, h5py, scikit-learn, tqdm,
# matplotlib and pyyaml, but not anndata; pandas is brought below 3, as anndata 0.12 needs.
# Run here once before the device run of benchmarks/gpu_check.sh, which carries .whl (see
# benchmarks/gpu_check.py). The set was checked for completeness with the cp311 builds of the
# same list in a fresh venv holding only the packages named above: anndata and zinbgrad import
# and fit.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "anndata==0.12.*" array-api-compat legacy-api-wrap natsort scverse-misc \
  "zarr>=3" donfig google-crc32c numcodecs msgspec session-info2 "pandas>=2.1,<3" pytz tzdata
ls -la .whl
