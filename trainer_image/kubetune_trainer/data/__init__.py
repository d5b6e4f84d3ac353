"""The trainer's data pipeline: validate records, apply templates, tokenize, pack.

Pure Python and torch: no object storage and no Kubernetes here, so every step is
testable on a CPU in seconds.
"""

from kubetune_trainer.data.packing import (
    Batch,
    PackedCollator,
    PaddedCollator,
    batch_rows,
    collate_packed,
    collate_padded,
    epoch_rows,
    pack_rows,
    packing_efficiency,
)
from kubetune_trainer.data.records import (
    Dataset,
    DatasetError,
    Record,
    load_records,
    split_train_validation,
)
from kubetune_trainer.data.templates import Encoded, TemplateError, encode_record
from kubetune_trainer.data.tokenize import (
    IGNORE_INDEX,
    Example,
    TokenizedDataset,
    TokenStats,
    tokenize_records,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Dataset",
    "DatasetError",
    "Encoded",
    "Example",
    "PackedCollator",
    "PaddedCollator",
    "Record",
    "TemplateError",
    "TokenStats",
    "TokenizedDataset",
    "batch_rows",
    "collate_packed",
    "collate_padded",
    "encode_record",
    "epoch_rows",
    "load_records",
    "pack_rows",
    "packing_efficiency",
    "split_train_validation",
    "tokenize_records",
]
