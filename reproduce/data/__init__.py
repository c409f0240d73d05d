"""Data sources of the pipeline: PixMo-Cap images, tiny offline models, the paper's numbers."""
