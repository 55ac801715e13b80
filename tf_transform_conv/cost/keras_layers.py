"""Cost rules of Keras's own layers: convolutions and `Dense`.

`conv2d_cost`, `depthwise_cost` and `dense_cost` give the parameters and
multiply-adds of one call; the registered rules add the kernel's zeros
(`nonzeros`, `nonzero_macs`). The pruning wrappers reuse these for the
layers they wrap. See `tf_transform_conv.cost` for the formulas.
"""

import math

import keras
import numpy as np

from tf_transform_conv.cost.core import CostTerms
from tf_transform_conv.cost.core import built_params
from tf_transform_conv.cost.core import check_built_channels
from tf_transform_conv.cost.core import image_dims
from tf_transform_conv.cost.core import register_layer_cost
from tf_transform_conv.cost.core import require_known
from tf_transform_conv.cost.core import is_shape

__all__ = [
    "check_dense_input",
    "check_image_input",
    "conv2d_cost",
    "dense_cost",
    "depthwise_cost",
    "kernel_nonzeros",
]


def check_image_input(layer, input_shape):
    """Raises early for an image layer given an input shape of the wrong rank."""
    image_dims(layer, input_shape)


def check_dense_input(layer, input_shape):
    """Raises early for a `Dense` given an input shape it cannot take."""
    dense_input_channels(layer, input_shape)


def kernel_nonzeros(layer, terms, kernel):
    """`terms` with `nonzeros` and `nonzero_macs` counting only `kernel`'s nonzero entries.

    `nonzeros` is `params` less the kernel's zeros and `nonzero_macs` is
    `macs * nnz / size` (what sparse execution costs). An unbuilt layer's
    terms are returned as they are.
    """
    if not layer.built:
        return terms
    kernel = np.asarray(kernel)
    nnz = int(np.count_nonzero(kernel))
    return terms.replace(nonzeros=terms.params - (kernel.size - nnz),
                         nonzero_macs=terms.macs // max(kernel.size, 1) * nnz)


def conv2d_cost(layer, input_shape, output_shape):
    """`CostTerms` of a `Conv2D` call (strides, dilation, padding, `groups`), kernel zeros not counted."""
    c = image_dims(layer, input_shape)[2]
    oh, ow, _ = image_dims(layer, output_shape, what="output")
    kh, kw = layer.kernel_size
    groups = layer.groups
    if c % groups:
        raise ValueError(
            f"The input channels ({c}) of layer '{layer.name}' must be "
            f"divisible by groups={groups}. Received input_shape={input_shape}."
        )
    per_group = c // groups
    check_built_channels(layer, per_group, 2, input_shape)
    params = kh * kw * per_group * layer.filters
    params += layer.filters if layer.use_bias else 0
    macs = oh * ow * kh * kw * per_group * layer.filters
    return CostTerms(built_params(layer, params), macs)


def depthwise_cost(layer, input_shape, output_shape):
    """`CostTerms` of a `DepthwiseConv2D` call, kernel zeros not counted."""
    c = image_dims(layer, input_shape)[2]
    oh, ow, _ = image_dims(layer, output_shape, what="output")
    kh, kw = layer.kernel_size
    mult = layer.depth_multiplier
    check_built_channels(layer, c, 2, input_shape)
    params = kh * kw * c * mult + (c * mult if layer.use_bias else 0)
    macs = oh * ow * kh * kw * c * mult
    return CostTerms(built_params(layer, params), macs)


@register_layer_cost(keras.layers.SeparableConv2D, check_input=check_image_input)
def _separable_cost(layer, input_shape, output_shape):
    c = image_dims(layer, input_shape)[2]
    oh, ow, _ = image_dims(layer, output_shape, what="output")
    kh, kw = layer.kernel_size
    mult, filters = layer.depth_multiplier, layer.filters
    if layer.built:
        check_built_channels(layer, c, 2, input_shape, "depthwise_kernel")
    depthwise = kh * kw * c * mult
    pointwise = c * mult * filters
    params = depthwise + pointwise + (filters if layer.use_bias else 0)
    return CostTerms(built_params(layer, params), oh * ow * (depthwise + pointwise))


@register_layer_cost(keras.layers.Conv2DTranspose, check_input=check_image_input)
def _transpose_cost(layer, input_shape, output_shape):
    h, w, c = image_dims(layer, input_shape)
    kh, kw = layer.kernel_size
    check_built_channels(layer, c, 3, input_shape)  # kernel (kh, kw, filters, c_in)
    params = kh * kw * c * layer.filters + (layer.filters if layer.use_bias else 0)
    return CostTerms(built_params(layer, params), h * w * kh * kw * c * layer.filters)


def dense_cost(layer, input_shape, output_shape):
    """`CostTerms` of a `Dense` call on inputs of any rank `(..., c_in)`, kernel zeros not counted."""
    c = dense_input_channels(layer, input_shape)
    check_built_channels(layer, c, 0, input_shape)
    params = c * layer.units + (layer.units if layer.use_bias else 0)
    macs = math.prod(input_shape[:-1]) * c * layer.units
    return CostTerms(built_params(layer, params), macs)


def dense_input_channels(layer, input_shape):
    """The input channels of a `Dense` call; a ValueError for a shape it cannot take."""
    if not is_shape(input_shape) or len(input_shape) < 1:
        raise ValueError(
            f"Layer '{layer.name}' (Dense) expects an input_shape of rank at "
            "least 1 without the batch dimension, `(..., channels)`. Received "
            f"input_shape={input_shape}."
        )
    require_known(layer, input_shape, input_shape)
    return input_shape[-1]


@register_layer_cost(keras.layers.Conv2D, check_input=check_image_input)
def _conv2d_rule(layer, input_shape, output_shape):
    return kernel_nonzeros(layer, conv2d_cost(layer, input_shape, output_shape),
                           layer.kernel if layer.built else None)


@register_layer_cost(keras.layers.DepthwiseConv2D, check_input=check_image_input)
def _depthwise_rule(layer, input_shape, output_shape):
    return kernel_nonzeros(layer, depthwise_cost(layer, input_shape, output_shape),
                           layer.kernel if layer.built else None)


@register_layer_cost(keras.layers.Dense, check_input=check_dense_input)
def _dense_rule(layer, input_shape, output_shape):
    return kernel_nonzeros(layer, dense_cost(layer, input_shape, output_shape),
                           layer.kernel if layer.built else None)
