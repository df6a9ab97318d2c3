"""Orchestration above the pipeline: train -> evaluate -> explain -> report, and segmenting files."""
