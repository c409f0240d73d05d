"""The paper's pipeline steps: download, banks, lenses, judging (python -m reproduce STEP)."""
