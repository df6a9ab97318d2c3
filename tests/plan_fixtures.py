"""A planner fingerprint built by hand (the planner's rules tested without data): a 28 px gray binary
MedMNIST-format file of 1000/200/400 cases at 1:3; keyword arguments replace fields."""

from __future__ import annotations


def fingerprint(**over):
    from medlens.data.fingerprint import Fingerprint, Intensity

    it = Intensity(mean=0.4, std=0.2, min=0, max=1, p01=0, p99=1, distinct_values=256, zero_fraction=0.01,
                   channel_means=[0.4], corner_to_centre=0.9)
    d = dict(source="medmnist", location="x.npz", task="binary", spatial_dims=2, image_shape=[28, 28], channels=1,
             n={"train": 1000, "val": 200, "test": 400}, n_classes=2, class_names=["0", "1"],
             class_counts={"train": [250, 750], "val": [50, 150], "test": [150, 250]}, imbalance_ratio=3.0,
             patient_ids=False, intensity=it, modality_hints=[], field_of_view="full", resolutions_on_disk=[28],
             resolution_files={28: "x.npz"})
    d.update(over)
    return Fingerprint.model_validate(d)


def explain_by_hand(k: int, val_rate: float, budget: float, select: int = 8, score: int = 32) -> float:
    """docs/auto.md: the report's explanation section of a k-member model, 240 inferences per image explained
    (5 candidate methods on the selection images, the chosen one on the scoring images), the image counts scaled
    down (at least 2 and 8) where the section would take more than 5% of the budget."""
    full = 240 * (select * 5 + score) * k / val_rate
    if full > 0.05 * budget:
        f = 0.05 * budget / full
        select, score = max(2, int(select * f)), max(8, int(score * f))
    return 240 * (select * 5 + score) * k / val_rate
