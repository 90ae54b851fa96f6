#!/usr/bin/env bash
# Build the whole site with every tutorial executed (the CI build executes only the tutorials
# listed in docs/tutorials/ci.txt), then check it in headless Chromium when one is installed.
# Usage: bash docs/build.sh [--no-browser-check] [extra sphinx-build options]
# Needs: pip install -c docs/constraints.txt -e ".[docs]"; for the check, Debian's chromium and
# chromium-driver (apt-get install chromium chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."
check=1
if [ "${1:-}" = "--no-browser-check" ]; then check=0; shift; fi
ZINBGRAD_DOCS_EXECUTE=all sphinx-build -W --keep-going -b html docs docs/_build/html "$@"
if [ "$check" = 1 ]; then
    python docs/browser_check.py --all-tutorials --html docs/_build/html --out docs/_build/screenshots
fi
