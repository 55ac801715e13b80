"""tf_transform_conv: compact CNNs whose filters are cheap spatial transforms of a few bases."""

from tf_transform_conv import assignment
from tf_transform_conv import budget
from tf_transform_conv import convert
from tf_transform_conv import cost
from tf_transform_conv import distill
from tf_transform_conv import export
from tf_transform_conv import importance
from tf_transform_conv import knapsack
from tf_transform_conv import models
from tf_transform_conv import recalibrate
from tf_transform_conv import rewrite
from tf_transform_conv import structured
from tf_transform_conv import transforms
from tf_transform_conv import unstructured
from tf_transform_conv.budget import Budget
from tf_transform_conv.budget import plan_budget
from tf_transform_conv.convert import transform_model
from tf_transform_conv.cost import model_cost
from tf_transform_conv.distill import InnerDistiller
from tf_transform_conv.export import export_saved_model
from tf_transform_conv.export import export_tflite
from tf_transform_conv.export import verify_tflite
from tf_transform_conv.importance import SparsityTuner
from tf_transform_conv.importance import dafp_importance
from tf_transform_conv.importance import dafp_keep
from tf_transform_conv.knapsack import knapsack_removal
from tf_transform_conv.knapsack import solve_knapsack
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.models import build_model
from tf_transform_conv.models import conv_factory
from tf_transform_conv.recalibrate import recalibrate_batch_norm
from tf_transform_conv.structured import ChannelGroup
from tf_transform_conv.structured import channel_groups
from tf_transform_conv.structured import removal_cost
from tf_transform_conv.structured import remove_filters
from tf_transform_conv.pruning import TransformPruning
from tf_transform_conv.pruning import TransformPruningSummaries
from tf_transform_conv.pruning import UpdateTransformPruningStep
from tf_transform_conv.pruning import prune_globally
from tf_transform_conv.pruning import prune_model
from tf_transform_conv.pruning import strip_model
from tf_transform_conv.pruning import taylor_scores
from tf_transform_conv.pruning import update_pruning_step
from tf_transform_conv.unstructured import FilterBasisConv2D
from tf_transform_conv.unstructured import FilterBasisTransformConv2D
from tf_transform_conv.unstructured import InterspacePruning
from tf_transform_conv.unstructured import MagnitudePruning
from tf_transform_conv.unstructured import prune_interspace
from tf_transform_conv.unstructured import prune_low_magnitude

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
    "FilterBasisConv2D",
    "FilterBasisTransformConv2D",
    "InterspacePruning",
    "MagnitudePruning",
    "prune_interspace",
    "prune_low_magnitude",
    "unstructured",
    "budget",
    "Budget",
    "knapsack",
    "knapsack_removal",
    "plan_budget",
    "solve_knapsack",
    "ChannelGroup",
    "channel_groups",
    "dafp_importance",
    "distill",
    "InnerDistiller",
    "dafp_keep",
    "importance",
    "removal_cost",
    "remove_filters",
    "SparsityTuner",
    "structured",
    "__version__",
]
