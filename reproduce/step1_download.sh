#!/usr/bin/env bash
# Step 1: Fetch connectors and the public Qwen2-VL bank (--tiny: make tiny models).
# A thin wrapper: every flag goes to `python -m reproduce download` (see --help).
# Skips the work that is already done; --force redoes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works before `pip install -e .` too
exec "${PYTHON:-$(command -v python || command -v python3)}" -m reproduce download "$@"
