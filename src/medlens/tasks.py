"""The task types medlens knows: one enum, compared and stored as its plain string value."""

from __future__ import annotations

from enum import StrEnum


class TaskType(StrEnum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    ORDINAL = "ordinal"        # multi-class with ordered grades (QWK, MAE reported)
    MULTILABEL = "multilabel"
    SEGMENTATION = "segmentation"

    @property
    def is_classification(self) -> bool:
        return self is not TaskType.SEGMENTATION


CLASSIFICATION_TASKS = tuple(t for t in TaskType if t.is_classification)
