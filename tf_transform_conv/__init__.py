"""tf_transform_conv: compact CNNs whose filters are cheap spatial transforms of a few bases."""

from tf_transform_conv import assignment
from tf_transform_conv import convert
from tf_transform_conv import cost
from tf_transform_conv import transforms
from tf_transform_conv.convert import transform_model
from tf_transform_conv.cost import model_cost
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.pruning import TransformPruning
from tf_transform_conv.pruning import TransformPruningSummaries
from tf_transform_conv.pruning import UpdateTransformPruningStep
from tf_transform_conv.pruning import prune_model
from tf_transform_conv.pruning import strip_model
from tf_transform_conv.pruning import update_pruning_step

__version__ = "0.1.0"

__all__ = [
    "TransformConv2D",
    "assignment",
    "convert",
    "TransformPruning",
    "TransformPruningSummaries",
    "UpdateTransformPruningStep",
    "cost",
    "model_cost",
    "prune_model",
    "strip_model",
    "transform_model",
    "transforms",
    "update_pruning_step",
    "__version__",
]
