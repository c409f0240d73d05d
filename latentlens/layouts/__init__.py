"""The visual-token layouts, one module per kind (see `latentlens.models.visual`)."""
