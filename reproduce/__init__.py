"""The paper's pipeline behind ``reproduce/*.sh``: download, banks, lenses, judge, report.

A face of the project like ``cli.py``: it wires the library (extraction, lenses,
``molmo``, ``reproduce.judge``) into steps that skip finished work, and nothing in
the library imports it. ``python -m reproduce --help`` lists the steps;
``reproduce/run_all.sh --tiny`` runs them all offline on tiny random models.
"""

from __future__ import annotations

from reproduce.data.pixmo import (
    PIXMO_CAP_REVISION,
    ImageRecord,
    ImageRow,
    ImageSourceError,
    match_captions,
    molmo_split,
    molmo_validation_order,
    pixmo_parquet_files,
    prepare_images,
    read_available,
    read_listing,
    read_manifest,
    read_pixmo_rows,
)
from reproduce.layout import PAPER_MODELS, Layout, bank_name, model_kind, run_folder

__all__ = [
    "PAPER_MODELS",
    "PIXMO_CAP_REVISION",
    "ImageRecord",
    "ImageRow",
    "ImageSourceError",
    "Layout",
    "bank_name",
    "model_kind",
    "match_captions",
    "molmo_split",
    "molmo_validation_order",
    "pixmo_parquet_files",
    "prepare_images",
    "read_available",
    "read_listing",
    "read_manifest",
    "read_pixmo_rows",
    "run_folder",
]
