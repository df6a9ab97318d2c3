"""Explanations: attribution maps (CAM family, gradients, occlusion, LIME/SHAP), feature views, faithfulness."""

from medlens.explain.methods import METHODS, explain, list_methods
from medlens.explain.layers import conv_layers, find_target_layer

__all__ = ["METHODS", "explain", "list_methods", "find_target_layer", "conv_layers"]
