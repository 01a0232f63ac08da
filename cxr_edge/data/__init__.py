"""Datasets as radiology users have them: class folders, pre-split folders, provenance, splits."""

from .layout import Dataset, DatasetItem, scan_dataset
from .split import SPLITS, split_dataset

__all__ = ["Dataset", "DatasetItem", "scan_dataset", "split_dataset", "SPLITS"]
