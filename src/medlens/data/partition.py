"""Splitting a dataset into federated sites: ``iid``, ``dirichlet:ALPHA`` (label skew), ``by-patient`` (each
patient's images at one site) or ``by-column:COL`` (a manifest column such as hospital or scanner).

Every split of a site comes from the same rule, so a site's train, validation and test cases are its own.
Partitions depend only on ``(seed, spec)``.
"""

from __future__ import annotations

import numpy as np

from medlens.errors import ConfigError


def parse_partition(spec: str) -> tuple[str, str | float | None]:
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "by-patient" and not arg:
        return "by-patient", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if alpha <= 0:
            raise ConfigError(f"--partition {spec}: dirichlet needs a positive ALPHA, e.g. dirichlet:0.5")
        return "dirichlet", alpha
    if kind == "by-column" and arg:
        return "by-column", arg
    raise ConfigError(f"--partition '{spec}' is not iid, dirichlet:ALPHA, by-patient or by-column:COL")


def partition(ds, n_sites: int, spec: str, seed: int = 0) -> list[np.ndarray]:
    """Index arrays, one per site, covering ``ds`` once (sorted within each site)."""
    kind, arg = parse_partition(spec)
    if n_sites < 1:
        raise ConfigError(f"--sites must be at least 1, not {n_sites}")
    rng = np.random.default_rng([seed, n_sites, len(ds)])
    n = len(ds)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), n_sites)
    elif kind == "dirichlet":
        assert isinstance(arg, float)  # parse_partition gives dirichlet its alpha
        y = np.asarray(ds.labels).reshape(len(ds), -1)[:, 0].astype(int)
        parts = [[] for _ in range(n_sites)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            # the class's shares depend on (seed, sites, class) only: a site's train, val and test agree
            share = np.random.default_rng([seed, n_sites, int(c)]).dirichlet(np.full(n_sites, float(arg)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        parts = [np.asarray(p, int) for p in parts]
    else:
        if kind == "by-patient":
            groups = np.asarray(ds.patient_ids).astype(str)
        else:
            cols = ds.meta.get("columns", {}) if isinstance(getattr(ds, "meta", None), dict) else {}
            if arg not in cols:
                raise ConfigError(f"--partition by-column:{arg}: the data has no column '{arg}' (a CSV manifest "
                                  "column is needed)")
            groups = np.asarray(cols[arg]).astype(str)
        keys = np.unique(groups)
        if kind == "by-column":
            if len(keys) != n_sites:
                raise ConfigError(f"--partition by-column:{arg}: the column has {len(keys)} values, not --sites "
                                  f"{n_sites}")
            site_of = {k: i for i, k in enumerate(keys)}
        else:
            order = rng.permutation(len(keys))
            site_of = {keys[j]: i % n_sites for i, j in enumerate(order)}
        owner = np.array([site_of[g] for g in groups])
        parts = [np.flatnonzero(owner == s) for s in range(n_sites)]
    return [np.sort(np.asarray(p, int)) for p in parts]
