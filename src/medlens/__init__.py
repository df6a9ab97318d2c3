"""medlens: deep learning on medical images, from scanner files to a validated, explained model.

The package follows the pipeline ``io -> data -> transforms -> models -> engine -> evaluation
-> explain -> report -> serve``; ``imaging`` (classical processing) sits beside it.
"""

from medlens.errors import MedlensError

__version__ = "0.1.0"
__all__ = ["MedlensError", "__version__"]
