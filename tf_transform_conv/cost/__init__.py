"""Parameters and multiply-adds, per layer and per model; see `cost.core` for the conventions.

`model_cost(model)` walks a model's graph and costs every layer call with
the rule registered for its class (`register_layer_cost`): Keras's
convolutions and `Dense` (`cost.keras_layers`), the package's layers
(`cost.transform_layers`), and each pruning wrapper (registered where the
wrapper is defined). `layer_cost(layer, input_shape)` costs one call.
"""

from tf_transform_conv.cost.core import CostTerms
from tf_transform_conv.cost.core import LayerCost
from tf_transform_conv.cost.core import ModelCost
from tf_transform_conv.cost.core import cost_terms
from tf_transform_conv.cost.core import layer_cost
from tf_transform_conv.cost.core import model_cost
from tf_transform_conv.cost.core import register_layer_cost
from tf_transform_conv.cost.keras_layers import conv2d_cost
from tf_transform_conv.cost.keras_layers import kernel_nonzeros
from tf_transform_conv.cost.transform_layers import filter_basis_nonzeros
from tf_transform_conv.cost.transform_layers import parameter_formula
from tf_transform_conv.cost.transform_layers import sparse_basis_terms
from tf_transform_conv.cost.transform_layers import transform_conv_cost

__all__ = [
    "CostTerms",
    "LayerCost",
    "ModelCost",
    "conv2d_cost",
    "cost_terms",
    "filter_basis_nonzeros",
    "kernel_nonzeros",
    "layer_cost",
    "model_cost",
    "parameter_formula",
    "register_layer_cost",
    "sparse_basis_terms",
    "transform_conv_cost",
]
