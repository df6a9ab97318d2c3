"""Model registry and architectures.

Importing the package imports every architecture module, whose ``@register_model`` decorators fill the
registry (the registry itself imports none of them: no cycle).
"""

from medlens.models import autoencoder, cnn, ensemble, imagenet, resnet, unet, vit  # noqa: F401  (registers the architectures)
from medlens.models.registry import ModelEntry, create_model, get_model_entry, list_models, register_model

__all__ = ["ModelEntry", "create_model", "get_model_entry", "list_models", "register_model"]
