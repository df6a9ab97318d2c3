"""Task labels from source labels: ``data.label_map`` (source label -> task label, ``null`` drops) and
``data.positive_class`` (which of two task labels is the positive class, index 1).

The seed's binary diabetic-retinopathy task is the example: Kaggle's (and RetinaMNIST's) five grades
become "No DR" (grade 0) against "Severe/Proliferative" (grades 3 and 4), the middle grades dropped:

    label_map: {0: No DR, 1: null, 2: null, 3: Severe/Proliferative, 4: Severe/Proliferative}
    positive_class: Severe/Proliferative

Without ``positive_class``, two classes named by the files (folders, CSV manifests) put a conventional negative
name (``NEGATIVE_NAMES``, ``no_*``; any case) first, so its partner is the positive class; two names of which
neither or both are conventional negatives are refused by training, asking for ``data.positive_class``
(alphabetical order once made "Normal" the positive class of an Abnormal/Normal manifest).
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from medlens.data.base import ArrayDataset, SplitData
from medlens.data.catalog import BINARY, MULTICLASS
from medlens.errors import DataError
from medlens.tasks import get_task


NEGATIVE_NAMES = ("normal", "negative", "benign", "healthy", "control", "0", "false")


def is_negative_name(name: str) -> bool:
    """A conventional name of the negative class: ``NEGATIVE_NAMES`` or ``no_*`` (``no-*``, ``no *``), any case."""
    n = str(name).strip().lower()
    return n in NEGATIVE_NAMES or re.match(r"no[_\- ]", n) is not None


def negative_first(names: list[str]) -> tuple[list[str], bool]:
    """Two class names with the conventional negative one first, and whether the names decided it (exactly one
    of them is a conventional negative); other lists come back unchanged, decided when they are not two."""
    if len(names) != 2:
        return list(names), True
    neg = [is_negative_name(n) for n in names]
    if neg == [False, True]:
        return [names[1], names[0]], True
    return list(names), neg == [True, False]


def positive_question(names: list[str]) -> str:
    """The one-line refusal of a binary task whose positive class nobody named."""
    return (f"which of the classes {names[0]!r} and {names[1]!r} is the positive class? Set data.positive_class "
            f"(conventional negative names, taken as negative without it: {', '.join(NEGATIVE_NAMES[:5])}, no_*)")


def task_classes(class_names: list[str], label_map: dict[str, str | None] | None,
                 positive_class: str | None, source_task: str) -> tuple[list[str], str, np.ndarray]:
    """``(task class names, task type, lookup)``: ``lookup[i]`` is the task index of source class ``i``
    (-1: dropped). Source classes are matched by name, else by index (``0``, ``1``...)."""
    n = len(class_names)
    if label_map is None:
        names = list(class_names)
        lookup = np.arange(n)
    else:
        unknown = [k for k in label_map if k not in class_names and not (k.isdigit() and int(k) < n)]
        if unknown:
            raise DataError(f"data.label_map names source label(s) {unknown} that the data does not have "
                            f"(it has {class_names})")
        targets = []
        lookup = np.full(n, -1, np.int64)
        missing = []
        for i, c in enumerate(class_names):
            key = c if c in label_map else (str(i) if str(i) in label_map else None)
            if key is None:
                missing.append(c)
                continue
            t = label_map[key]
            if t is None:
                continue
            if t not in targets:
                targets.append(t)
            lookup[i] = targets.index(t)
        if missing:
            raise DataError(f"data.label_map does not say what source label(s) {missing} become; map each to a "
                            "task label, or to null to drop it")
        names = targets
    if positive_class is not None:
        if len(names) != 2:
            raise DataError(f"data.positive_class needs two task classes, the data has {len(names)}: {names}")
        if positive_class not in names:
            raise DataError(f"data.positive_class {positive_class!r} is not a class of the data ({names})")
        if names[1] != positive_class:
            names = [names[1], names[0]]
            lookup = np.where(lookup >= 0, 1 - lookup, -1)
    kept = lookup[lookup >= 0]
    if len(names) == 2:
        task = BINARY
    elif label_map is None:
        task = source_task
    elif get_task(source_task).ordered and list(kept) == sorted(kept):  # a monotone map keeps the grades ordered
        task = source_task
    else:
        task = MULTICLASS
    return names, task, lookup


def _relabel(ds: ArrayDataset, names: list[str], task: str, lookup: np.ndarray) -> ArrayDataset:
    new = lookup[ds.labels]
    keep = np.flatnonzero(new >= 0)
    sub = ds.subset(keep)
    return ArrayDataset(sub.images, new[keep], task, list(names), sub.patient_ids, sub.sources, ds.name,
                        dict(ds.meta, label_map=True))


def apply_label_map(data: SplitData, label_map: dict[str, str | None] | None,
                    positive_class: str | None) -> SplitData:
    """``data`` with its labels mapped (dropped samples removed from every split) and the positive class
    moved to index 1. A split left with fewer than two classes is an error naming the split."""
    if label_map is None and positive_class is None:
        return data
    task = get_task(data.task)
    if not task.exclusive:
        raise DataError(f"data.label_map / data.positive_class do not apply to {task.title} data")
    names, task, lookup = task_classes(list(data.class_names), label_map, positive_class, data.task)
    arrays = [d for d in (data.train, data.val, data.test) if isinstance(d, ArrayDataset)]
    if len(arrays) < 3:  # the patch store: two fixed classes, positive swapped
        if list(lookup) == [0, 1]:
            return data
        raise DataError("a patch store's positive class is 'nodule'; data.positive_class cannot change it")
    parts = [_relabel(d, names, task, lookup) for d in arrays]
    for split, d in zip(("train", "val", "test"), parts):
        if len(np.unique(d.labels)) < 2:
            raise DataError(f"after data.label_map the {split} split holds {len(d)} sample(s) of "
                            f"{len(np.unique(d.labels))} class(es); it needs both classes")
    how = data.split_method + (f"; labels mapped to {names}" if label_map else "") + \
        (f"; positive class {positive_class!r}" if positive_class else "")
    # a label map's task labels keep the order it names them in (its second one positive, as before): explicit
    binary = len(names) == 2
    return replace(data, train=parts[0], val=parts[1], test=parts[2], split_method=how,
                   positive_class=names[1] if binary else None, needs_positive=False)


__all__ = ["apply_label_map", "task_classes", "is_negative_name", "negative_first", "positive_question", "BINARY", "MULTICLASS"]
