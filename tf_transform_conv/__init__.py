"""tf_transform_conv: compact CNNs whose filters are cheap spatial transforms of a few bases.

The names a user needs are here; the rest is in the subpackages, each one
idea: `ops` (the math), `layers`, `graph` (walking and rewriting models),
`cost`, `saliency`, `pruning`, `structured`, `export`, and the modules
`reconstruction`, `convert`, `budget`, `distill`, `recalibrate`, `models`,
`analyze`, `knapsack`, and `sparsity` (tfmot's `sparsity.keras` names).
See `docs/architecture.md` for the map.
"""

from tf_transform_conv import _compat
from tf_transform_conv.budget import Budget
from tf_transform_conv.budget import plan_budget
from tf_transform_conv.convert import transform_model
from tf_transform_conv.cost import model_cost
from tf_transform_conv.distill import InnerDistiller
from tf_transform_conv.export import export_saved_model
from tf_transform_conv.export import export_tflite
from tf_transform_conv.export import verify_tflite
from tf_transform_conv.graph import channel_groups
from tf_transform_conv.layers import FilterBasisConv2D
from tf_transform_conv.layers import FilterBasisTransformConv2D
from tf_transform_conv.layers import TransformConv2D
from tf_transform_conv.models import build_model
from tf_transform_conv.models import conv_factory
from tf_transform_conv.pruning import InterspacePruning
from tf_transform_conv.pruning import MagnitudePruning
from tf_transform_conv.pruning import TransformPruning
from tf_transform_conv.pruning import TransformPruningSummaries
from tf_transform_conv.pruning import UpdateTransformPruningStep
from tf_transform_conv.pruning import prune_interspace
from tf_transform_conv.pruning import prune_low_magnitude
from tf_transform_conv.pruning import prune_model
from tf_transform_conv.pruning import strip_model
from tf_transform_conv.pruning import update_pruning_step
from tf_transform_conv.recalibrate import recalibrate_batch_norm
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.structured import knapsack_removal
from tf_transform_conv.structured import remove_filters

# On the JAX backend, a training step that fails while it is traced must leave
# the model's weights in place (`_compat.keep_jax_state_on_failure`).
_compat.keep_jax_state_on_failure()

# Imported for its registered Keras class: after `import tf_transform_conv`, a
# `.keras` file saved with an optimizer on that learning-rate schedule (the
# training recipe's `final.keras`) loads with a plain `keras.saving.load_model`.
from tf_transform_conv.training import schedules as _schedules  # noqa: F401, E402

# `tf_transform_conv.sparsity` mirrors `tfmot.sparsity` (`import tf_transform_conv
# as tfmot` runs a tfmot script's `tfmot.sparsity.keras.*` here).
from tf_transform_conv import sparsity  # noqa: F401, E402

__version__ = "0.2.0"

__all__ = [
    "Budget",
    "FilterBasisConv2D",
    "FilterBasisTransformConv2D",
    "InnerDistiller",
    "InterspacePruning",
    "MagnitudePruning",
    "Reconstruction",
    "TransformConv2D",
    "TransformPruning",
    "TransformPruningSummaries",
    "UpdateTransformPruningStep",
    "__version__",
    "build_model",
    "channel_groups",
    "conv_factory",
    "export_saved_model",
    "export_tflite",
    "knapsack_removal",
    "model_cost",
    "plan_budget",
    "prune_interspace",
    "prune_low_magnitude",
    "prune_model",
    "recalibrate_batch_norm",
    "remove_filters",
    "strip_model",
    "transform_model",
    "update_pruning_step",
    "verify_tflite",
]
