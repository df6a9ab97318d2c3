"""Classical image processing beside the deep-learning pipeline (uses ``medlens.io``)."""
