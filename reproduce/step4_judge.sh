#!/usr/bin/env bash
# Step 4: Judge every (lens, model) with an LLM (SPEC §7).
# A thin wrapper: every flag goes to `python -m reproduce judge` (see --help).
# Skips the work that is already done; --force redoes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works before `pip install -e .` too
exec "${PYTHON:-$(command -v python || command -v python3)}" -m reproduce judge "$@"
