#!/usr/bin/env bash
# Step 2: Build one contextual bank per LLM from a caption corpus (paper mode).
# A thin wrapper: every flag goes to `python -m reproduce extract` (see --help).
# Skips the work that is already done; --force redoes it.
# The paper's corpus is Visual Genome's region phrases, one per line: download
# region_descriptions.json (visualgenome.org) and run
#   python -m reproduce vg-phrases region_descriptions.json vg_phrases.txt
# then pass --corpus vg_phrases.txt. Any corpus file works (.txt, .csv first column, .jsonl).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works before `pip install -e .` too
exec "${PYTHON:-$(command -v python || command -v python3)}" -m reproduce extract "$@"
