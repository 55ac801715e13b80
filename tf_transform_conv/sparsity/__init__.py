"""`tfmot.sparsity` for Keras 3: `tf_transform_conv.sparsity.keras` mirrors `tfmot.sparsity.keras`.

`import tf_transform_conv as tfmot` makes `tfmot.sparsity.keras.NAME` of a
tensorflow-model-optimization script resolve here; the same names are also
at `tf_transform_conv.sparsity.NAME`. See the guide "Coming from tfmot".
"""

from tf_transform_conv.sparsity import keras
from tf_transform_conv.sparsity.keras import ConstantSparsity
from tf_transform_conv.sparsity.keras import PolynomialDecay
from tf_transform_conv.sparsity.keras import PrunableLayer
from tf_transform_conv.sparsity.keras import PruneForLatencyOnXNNPack
from tf_transform_conv.sparsity.keras import PruningPolicy
from tf_transform_conv.sparsity.keras import PruningSummaries
from tf_transform_conv.sparsity.keras import UpdatePruningStep
from tf_transform_conv.sparsity.keras import prune_low_magnitude
from tf_transform_conv.sparsity.keras import prune_scope
from tf_transform_conv.sparsity.keras import strip_pruning

__all__ = [
    "ConstantSparsity",
    "PolynomialDecay",
    "PrunableLayer",
    "PruneForLatencyOnXNNPack",
    "PruningPolicy",
    "PruningSummaries",
    "UpdatePruningStep",
    "keras",
    "prune_low_magnitude",
    "prune_scope",
    "strip_pruning",
]
