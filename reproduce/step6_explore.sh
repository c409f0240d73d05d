#!/usr/bin/env bash
# Step 6: the explorer site of the run (<out>/site/index.html, works from file://).
# A thin wrapper: every flag goes to `python -m reproduce explore` (see --help).
# Skips the work that is already done (site newer than every input); --force redoes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works before `pip install -e .` too
exec "${PYTHON:-$(command -v python || command -v python3)}" -m reproduce explore "$@"
