"""Preprocessing (intensity, colour, size) and batch augmentation."""
