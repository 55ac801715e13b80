"""Training as pruning, split the way tensorflow-model-optimization splits it.

- `schedules`: the schedule contract (`PolynomialDecay` /
  `ConstantSparsity`, tfmot's without tfmot, or tfmot's own as they are, or any `schedule(step) -> (should_prune,
  sparsity)`), saving schedules, and `ScaledSchedule` for budgets.
- `wrapper`: `PruningWrapper`, the one protocol every wrapper follows, and
  `FrozenLayerWarning` (a wrapped layer with `trainable=False`).
- `transform_pruning`: `TransformPruning`, filters rebuilt from kept bases.
- `magnitude`, `interspace`: unstructured pruning, `MagnitudePruning` and
  `InterspacePruning` (filter-basis coefficients).
- `step`: advancing every wrapper of a model to a step
  (`update_pruning_step`, `prune_globally`, `taylor_scores`).
- `callbacks`: `UpdateTransformPruningStep`, `TransformPruningSummaries`
  (and tfmot's names for them, `UpdatePruningStep`, `PruningSummaries`).
- `prunable`: `PrunableLayer`, the contract of a custom layer to prune.
- `policy`: `PruningPolicy`, `PruneForLatencyOnXNNPack`.
- `prune`: the verbs, `prune_model`, `prune_low_magnitude`,
  `prune_interspace`, `strip_model`.

tfmot itself is never imported at import time (importing it switches
`tf.keras` to legacy Keras for the whole process).
"""

from tf_transform_conv.pruning.callbacks import PruningSummaries
from tf_transform_conv.pruning.callbacks import TransformPruningSummaries
from tf_transform_conv.pruning.callbacks import UpdatePruningStep
from tf_transform_conv.pruning.callbacks import UpdateTransformPruningStep
from tf_transform_conv.pruning.interspace import InterspacePruning
from tf_transform_conv.pruning.magnitude import MagnitudePruning
from tf_transform_conv.pruning.policy import PruneForLatencyOnXNNPack
from tf_transform_conv.pruning.policy import PruningPolicy
from tf_transform_conv.pruning.prunable import PrunableLayer
from tf_transform_conv.pruning.prune import prune_interspace
from tf_transform_conv.pruning.prune import prune_low_magnitude
from tf_transform_conv.pruning.prune import prune_model
from tf_transform_conv.pruning.prune import strip_model
from tf_transform_conv.pruning.schedules import ConstantSparsity
from tf_transform_conv.pruning.schedules import PolynomialDecay
from tf_transform_conv.pruning.schedules import ScaledSchedule
from tf_transform_conv.pruning.schedules import final_sparsity
from tf_transform_conv.pruning.step import prune_globally
from tf_transform_conv.pruning.step import taylor_scores
from tf_transform_conv.pruning.step import update_pruning_step
from tf_transform_conv.pruning.transform_pruning import TransformPruning
from tf_transform_conv.pruning.wrapper import FrozenLayerWarning
from tf_transform_conv.pruning.wrapper import PruningWrapper

__all__ = [
    "ConstantSparsity",
    "FrozenLayerWarning",
    "InterspacePruning",
    "MagnitudePruning",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneForLatencyOnXNNPack",
    "PruningPolicy",
    "PruningSummaries",
    "PruningWrapper",
    "ScaledSchedule",
    "TransformPruning",
    "TransformPruningSummaries",
    "UpdatePruningStep",
    "UpdateTransformPruningStep",
    "final_sparsity",
    "prune_globally",
    "prune_interspace",
    "prune_low_magnitude",
    "prune_model",
    "strip_model",
    "taylor_scores",
    "update_pruning_step",
]
