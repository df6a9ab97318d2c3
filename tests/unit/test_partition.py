"""Issue 15: federated site partitions (no training)."""

import numpy as np
import pytest

from medlens.data.base import ArrayDataset
from medlens.data.partition import partition
from medlens.errors import ConfigError


def _ds(n=200, k=3):
    y = (np.arange(n) % k).reshape(-1, 1)
    return ArrayDataset(np.zeros((n, 1, 4, 4), np.uint8), y, "multiclass", [str(i) for i in range(k)],
                        patient_ids=np.array([f"p{i // 4}" for i in range(n)]))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.1", "by-patient"])
def test_every_case_at_exactly_one_site(spec):
    parts = partition(_ds(), 5, spec, seed=0)
    assert len(parts) == 5
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(200))
    assert partition(_ds(), 5, spec, seed=0)[2].tolist() == parts[2].tolist()  # same seed, same sites


def test_iid_sizes_and_patients_kept_together():
    assert sorted(len(p) for p in partition(_ds(), 5, "iid")) == [40] * 5
    ds = _ds()
    owners = {}
    for s, idx in enumerate(partition(ds, 5, "by-patient")):
        for pid in set(ds.patient_ids[idx]):
            assert owners.setdefault(pid, s) == s


def test_small_alpha_skews_labels():
    ds = _ds(3000)
    y = ds.labels.reshape(-1)
    # label entropy per site: lower (more skewed) with alpha 0.1 than IID
    def mean_max_share(spec):
        return np.mean([np.bincount(y[p], minlength=3).max() / max(len(p), 1) for p in partition(ds, 5, spec)])
    assert mean_max_share("dirichlet:0.1") > mean_max_share("iid") + 0.2


@pytest.mark.parametrize("spec", ["dirichlet:-1", "dirichlet:x", "random", "by-column:site"])
def test_bad_partition_is_one_line(spec):
    with pytest.raises(ConfigError) as e:
        partition(_ds(), 5, spec)
    assert "\n" not in str(e.value) and "--partition" in str(e.value)
