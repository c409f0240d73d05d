"""Exception types raised by latentlens for user-facing mistakes."""

from __future__ import annotations


class LatentLensError(Exception):
    """Base class of every error latentlens raises on purpose."""


class BankFormatError(LatentLensError, ValueError):
    """A bank directory or file is missing, corrupt, unsafe or of an unknown format."""


class BankNotFoundError(BankFormatError, FileNotFoundError):
    """No bank at the given path (neither our layout nor the original release's)."""


class LayerNotFoundError(LatentLensError, KeyError):
    """A requested layer is not in the bank (the message lists the available ones)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class DimensionMismatchError(LatentLensError, ValueError):
    """A vector's width differs from the bank's or model's hidden size."""


class InvalidQueryError(LatentLensError, ValueError):
    """Queries are empty, non-finite or zero vectors."""


class UnsupportedArchitectureError(LatentLensError, KeyError):
    """A model type has no entry in the architecture registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CorpusError(LatentLensError, ValueError):
    """A corpus is empty, unreadable or of an unknown format."""


class ExploreError(LatentLensError, ValueError):
    """The explorer cannot read its results or write the site (says which and why)."""
