#!/usr/bin/env bash
# Step 3: Run LatentLens, LogitLens and EmbeddingLens at every layer over N images.
# A thin wrapper: every flag goes to `python -m reproduce lenses` (see --help).
# Skips the work that is already done; --force redoes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works before `pip install -e .` too
exec "${PYTHON:-$(command -v python || command -v python3)}" -m reproduce lenses "$@"
