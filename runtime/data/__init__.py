"""Datasets loaded into memory (`load_dataset`) and their split between clients
(`partition_indices`, `client_data`)."""

from fedkube.runtime.data.datasets import (
    DATASET_NAMES,
    Dataset,
    DatasetError,
    clear_cache,
    client_data,
    load_dataset,
    read_idx,
)
from fedkube.runtime.data.partition import PartitionKind, partition_indices

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "PartitionKind",
    "clear_cache",
    "client_data",
    "load_dataset",
    "partition_indices",
    "read_idx",
]
