"""The trainer's data pipeline: validate records, apply templates, tokenize, pack.

Pure Python and torch: no object storage and no Kubernetes here, so every step is
testable on a CPU in seconds.

The names below are imported on first use (PEP 562), so that `kubetune_trainer.data.records`,
which needs only the standard library, can be imported without torch: the OpenAI-compatible
API server validates uploaded files with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "packing": (
        "Batch",
        "PackedCollator",
        "PaddedCollator",
        "batch_rows",
        "collate_packed",
        "collate_padded",
        "epoch_rows",
        "pack_rows",
        "packing_efficiency",
    ),
    "records": ("Dataset", "DatasetError", "Record", "load_records", "split_train_validation"),
    "templates": ("Encoded", "TemplateError", "encode_record"),
    "tokenize": ("IGNORE_INDEX", "Example", "TokenizedDataset", "TokenStats", "tokenize_records"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

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


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
