"""tf_transform_conv: compact CNNs whose filters are cheap spatial transforms of a few bases."""

from tf_transform_conv import assignment
from tf_transform_conv import convert
from tf_transform_conv import cost
from tf_transform_conv import export
from tf_transform_conv import models
from tf_transform_conv import recalibrate
from tf_transform_conv import rewrite
from tf_transform_conv import transforms
from tf_transform_conv.convert import transform_model
from tf_transform_conv.cost import model_cost
from tf_transform_conv.export import export_saved_model
from tf_transform_conv.export import export_tflite
from tf_transform_conv.export import verify_tflite
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.models import build_model
from tf_transform_conv.models import conv_factory
from tf_transform_conv.recalibrate import recalibrate_batch_norm
from tf_transform_conv.pruning import TransformPruning
from tf_transform_conv.pruning import TransformPruningSummaries
from tf_transform_conv.pruning import UpdateTransformPruningStep
from tf_transform_conv.pruning import prune_globally
from tf_transform_conv.pruning import prune_model
from tf_transform_conv.pruning import strip_model
from tf_transform_conv.pruning import taylor_scores
from tf_transform_conv.pruning import update_pruning_step

__version__ = "0.1.0"

__all__ = [
    "assignment",
    "build_model",
    "conv_factory",
    "convert",
    "cost",
    "export",
    "export_saved_model",
    "export_tflite",
    "model_cost",
    "models",
    "prune_globally",
    "prune_model",
    "recalibrate",
    "recalibrate_batch_norm",
    "rewrite",
    "strip_model",
    "taylor_scores",
    "transform_model",
    "TransformConv2D",
    "TransformPruning",
    "TransformPruningSummaries",
    "transforms",
    "update_pruning_step",
    "UpdateTransformPruningStep",
    "verify_tflite",
    "__version__",
]
