"""Molmo-style connector VLMs of the LatentLens paper (3 LLMs × 3 vision encoders).

Placeholder until the molmo issue lands: importing it works, loading a model does not yet.
"""

from __future__ import annotations

__all__: list[str] = []
