"""Published numbers that the benchmarks print beside their own measurements, each with its source.

Nothing in this module is measured by medlens. A benchmark that prints one of these numbers prints
its source beside it (``MedMNISTBaseline.source``); the library (``src/medlens``) never imports it.

MedMNIST v2 baselines
---------------------
Yang J, Shi R, Wei D, Liu Z, Zhao L, Ke B, Pfister H, Ni B. "MedMNIST v2 - A large-scale lightweight
benchmark for 2D and 3D biomedical image classification". Scientific Data 10:41 (2023),
doi:10.1038/s41597-022-01721-8 (arXiv:2110.14795). Section "Technical Validation": the benchmark
table of the 2D datasets (MedMNIST2D) and the benchmark table of the 3D datasets (MedMNIST3D), each
giving test-set AUC and ACC per method (row) and dataset (column pair). The tables are identified
here by their content (MedMNIST2D / MedMNIST3D benchmark) rather than by number.

- Rows of the 2D table: "ResNet-18 (28)", "ResNet-18 (224)", "ResNet-50 (28)", "ResNet-50 (224)",
  "auto-sklearn", "AutoKeras", "Google AutoML Vision"; (28) / (224) is the input resolution.
- Rows of the 3D table (all at 28^3): "ResNet-18+2.5D", "ResNet-18+3D", "ResNet-18+ACS",
  "ResNet-50+2.5D", "ResNet-50+3D", "ResNet-50+ACS", "auto-sklearn", "AutoKeras".
- Columns: "PneumoniaMNIST", "RetinaMNIST" (2D); "AdrenalMNIST3D" (3D). ACC is the MedMNIST
  evaluator's: threshold 0.5 (binary) or argmax; AUC is ROC AUC (macro one-vs-rest for RetinaMNIST).
- The numbers are on the official MedMNIST test splits; a benchmark compares them with its own
  measurement on the same split (it prints the test n it measured).
"""

from __future__ import annotations

from dataclasses import dataclass

MEDMNIST_V2 = ("Yang et al., MedMNIST v2, Scientific Data 10:41 (2023), doi:10.1038/s41597-022-01721-8")


@dataclass(frozen=True)
class MedMNISTBaseline:
    """One cell pair (AUC, ACC) of a MedMNIST v2 benchmark table."""

    dataset: str     # medlens' catalogue name, e.g. "pneumoniamnist"
    column: str      # the dataset's column heading in the paper, e.g. "PneumoniaMNIST"
    table: str       # "MedMNIST2D benchmark" or "MedMNIST3D benchmark"
    row: str         # the method's row heading in the paper, exactly as printed
    auc: float
    acc: float

    @property
    def source(self) -> str:
        return f"{MEDMNIST_V2}, {self.table} table, row '{self.row}', column '{self.column}' (test AUC / ACC)"


_T2D, _T3D = "MedMNIST2D benchmark", "MedMNIST3D benchmark"

_ROWS: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {
    ("pneumoniamnist", "PneumoniaMNIST", _T2D): {
        "ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864),
        "ResNet-50 (28)": (0.948, 0.854), "ResNet-50 (224)": (0.962, 0.884),
        "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878), "Google AutoML Vision": (0.991, 0.946)},
    ("retinamnist", "RetinaMNIST", _T2D): {
        "ResNet-18 (28)": (0.717, 0.524), "ResNet-18 (224)": (0.710, 0.493),
        "ResNet-50 (28)": (0.726, 0.528), "ResNet-50 (224)": (0.716, 0.511),
        "auto-sklearn": (0.690, 0.515), "AutoKeras": (0.719, 0.503), "Google AutoML Vision": (0.750, 0.531)},
    ("adrenalmnist3d", "AdrenalMNIST3D", _T3D): {
        "ResNet-18+2.5D": (0.718, 0.772), "ResNet-18+3D": (0.827, 0.721), "ResNet-18+ACS": (0.839, 0.754),
        "ResNet-50+2.5D": (0.735, 0.748), "ResNet-50+3D": (0.828, 0.745), "ResNet-50+ACS": (0.818, 0.758),
        "auto-sklearn": (0.828, 0.802), "AutoKeras": (0.804, 0.705)},
}

#: dataset -> row -> the published cell pair, with its source
PAPER_BASELINES: dict[str, dict[str, MedMNISTBaseline]] = {
    ds: {row: MedMNISTBaseline(ds, col, table, row, auc, acc) for row, (auc, acc) in rows.items()}
    for (ds, col, table), rows in _ROWS.items()
}

#: the rows a benchmark compares against: the small-input ResNet-18, the strongest ResNet-50, per table
REFERENCE_ROWS = {_T2D: ("ResNet-18 (28)", "ResNet-50 (224)"), _T3D: ("ResNet-18+3D", "ResNet-50+3D")}


def sources(used: list[MedMNISTBaseline]) -> str:
    """One citation line for the published cells a table printed, grouped by table and column."""
    groups: dict[tuple[str, str], list[str]] = {}
    for b in used:
        rows = groups.setdefault((b.table, b.column), [])
        if b.row not in rows:
            rows.append(b.row)
    where = "; ".join(f"{t} table, column '{c}', rows " + ", ".join(f"'{r}'" for r in rows)
                      for (t, c), rows in groups.items())
    return f"{MEDMNIST_V2}: {where} (published test AUC / ACC, not measured here)"


def baselines_for(dataset: str | None) -> dict[str, MedMNISTBaseline]:
    """The published rows of one MedMNIST dataset (empty when the paper's tables are not copied here)."""
    return PAPER_BASELINES.get((dataset or "").lower(), {})


# MedMNIST+ (issue 17)
# --------------------
# Doerrich S, Di Salvo F, Brockmann J, Ledig C. "Rethinking model prototyping through the MedMNIST+ dataset
# collection". Scientific Reports (2025); arXiv:2404.15786. The best test AUC / ACC any of its models and
# training schemes reached per 2D dataset at 28 px (the MedMNIST+ 2D table; the 3D datasets are not in it).
MEDMNIST_PLUS = ("Doerrich et al., Rethinking model prototyping through the MedMNIST+ dataset collection, "
                 "Sci Rep (2025), arXiv:2404.15786")


@dataclass(frozen=True)
class MedMNISTPlusBest:
    """The best published 28 px cell pair of MedMNIST+ for one 2D dataset."""

    dataset: str
    size: int
    auc: float
    acc: float

    @property
    def source(self) -> str:
        return f"{MEDMNIST_PLUS}, best at {self.size} px (test AUC / ACC)"


MEDMNIST_PLUS_28: dict[str, MedMNISTPlusBest] = {
    "pneumoniamnist": MedMNISTPlusBest("pneumoniamnist", 28, 0.973, 0.866),
    "retinamnist": MedMNISTPlusBest("retinamnist", 28, 0.754, 0.543),
}


def medmnist_plus_for(dataset: str | None) -> MedMNISTPlusBest | None:
    """MedMNIST+'s best 28 px row of a 2D dataset (None for datasets outside its 2D table, e.g. 3D ones)."""
    return MEDMNIST_PLUS_28.get((dataset or "").lower())


#: issue 17's targets for `medlens train --auto` (test AUC, ACC) within its budget on the 2-core machine
AUTO_TARGETS: dict[str, tuple[float, float]] = {
    "pneumoniamnist": (0.991, 0.946), "retinamnist": (0.754, 0.543), "adrenalmnist3d": (0.88, 0.82)}
