"""The run contract: what a trained run folder holds, and the one way to open and use it.

``RunMeta`` (typed, versioned) is the content of ``run.json``; ``Run.open(dir)`` gives the config, meta,
class names, preprocessing, the validation-chosen threshold and the weights-only model; ``Predictor``
is the single input-preparation and inference path used by predict, explain, segment, evaluate and
everything that serves or exports a run.
"""

from medlens.run.folder import RunFolder, run_lock
from medlens.run.meta import SCHEMA_VERSION, Calibration, InputPrep, PredictionInterval, RunMeta, Threshold
from medlens.run.predictor import Prediction, Predictor
from medlens.run.run import Run

__all__ = ["SCHEMA_VERSION", "Calibration", "InputPrep", "PredictionInterval", "Prediction", "Predictor", "Run", "RunFolder", "RunMeta", "Threshold",
           "run_lock"]
