"""Cost rules of the package's layers: `TransformConv2D`, the filter-basis layers,
and `ChannelPad` and `ChannelGather` (no parameters, no multiply-adds: they
only move values).

`parameter_formula` is the parameter count of a `TransformConv2D`;
`transform_conv_cost` costs one call on the path the layer runs (the layer's
own count of both paths, `TransformConv2D.cost`); `filter_basis_nonzeros`
counts the sparse work of bases held in a filter basis, for the
`FilterBasisTransformConv2D` rule and for `InterspacePruning`'s. See
`tf_transform_conv.cost` for the formulas.
"""

import numpy as np

from tf_transform_conv.cost.core import CostTerms
from tf_transform_conv.cost.core import built_params
from tf_transform_conv.cost.core import check_built_channels
from tf_transform_conv.cost.core import image_dims
from tf_transform_conv.cost.core import pair
from tf_transform_conv.cost.core import register_layer_cost
from tf_transform_conv.cost.keras_layers import check_image_input
from tf_transform_conv.layers.channel_gather import ChannelGather
from tf_transform_conv.layers.channel_pad import ChannelPad
from tf_transform_conv.layers.filter_basis_conv import FilterBasisConv2D
from tf_transform_conv.layers.filter_basis_transform_conv import FilterBasisTransformConv2D
from tf_transform_conv.layers.transform_conv import TransformConv2D
from tf_transform_conv.ops import families as families_lib

__all__ = [
    "filter_basis_nonzeros",
    "parameter_formula",
    "sparse_basis_terms",
    "transform_conv_cost",
]


def parameter_formula(
    kernel_size, c_in, filters, base_filters, scale, use_bias,
    transform_family="discrete", transformed=0,
):
    """The parameter count of a `TransformConv2D`.

    `kh * kw * c_in * base_filters`, plus `filters` when `scale`, plus
    `filters` when `use_bias`, plus, for a learned transform family, the
    family's parameters per transformed (depth group, filter) pair
    (`ops.families.num_params`: `kh * kw` scalar, 2 rotation, 6 affine,
    `(kh * kw)**2` general). The same formula with
    `base_filters == filters` and `scale=False` is `Conv2D`'s.

    Args:
        kernel_size: int or pair of ints `(kh, kw)`.
        c_in: int, the input channels.
        filters: int, the output filters.
        base_filters: int, the learned base filters.
        scale: bool, whether each output filter has a scale.
        use_bias: bool, whether the layer has a bias.
        transform_family: the layer's family. Defaults to `"discrete"`.
        transformed: int, the (depth group, filter) pairs with a learned
            transform (`TransformConv2D.num_transformed`).

    Returns:
        int, the number of parameters.

    Raises:
        ValueError: if `kernel_size` is not an int or a pair of ints, or the
            family is unknown.

    Example:

    >>> parameter_formula(3, c_in=8, filters=16, base_filters=4, scale=True,
    ...                   use_bias=True)  # 3*3*8*4 + 16 + 16
    320
    >>> parameter_formula(3, c_in=8, filters=16, base_filters=4, scale=False,
    ...                   use_bias=True, transform_family="scalar",
    ...                   transformed=12)  # 3*3*8*4 + 16 + 12*9
    412
    """
    kh, kw = pair(kernel_size, "kernel_size")
    return (
        kh * kw * int(c_in) * int(base_filters)
        + (int(filters) if scale else 0)
        + (int(filters) if use_bias else 0)
        + int(transformed) * families_lib.num_params(transform_family, (kh, kw))
    )


def transform_conv_cost(layer, input_shape, output_shape=None):
    """`CostTerms` of a `TransformConv2D` call on the path it runs (built) or would run.

    The factored path's base products and second stage (additions for the
    discrete family, counted in `adds`; multiply-adds for a learned one,
    in `macs` and `transform_macs`), or the materialised path's dense
    multiply-adds. Zeros of the bases are not counted.
    """
    c = image_dims(layer, input_shape)[2]
    if c % layer.depth_groups:
        raise ValueError(
            f"The input channels ({c}) of layer '{layer.name}' must be "
            f"divisible by depth_groups={layer.depth_groups}. Received "
            f"input_shape={input_shape}."
        )
    check_built_channels(layer, c, 2, input_shape, "base_kernel")
    implementation = layer.implementation_used
    if implementation is None:  # not built: the choice build() would make
        implementation = layer.choose_implementation((None,) + tuple(input_shape))[0]
    transform_params = layer.num_transformed * families_lib.num_params(
        layer.transform_family, layer.kernel_size
    )
    params = parameter_formula(
        layer.kernel_size,
        c,
        layer.filters,
        layer.base_filters,
        layer.scale,
        layer.use_bias,
        layer.transform_family,
        layer.num_transformed,
    )
    # The layer's own count of both paths.
    paths = layer.cost(input_shape)
    dense = paths["dense_macs"]
    transform_macs = 0
    if implementation == "factored":
        transform_macs = paths["transform_macs"]
        macs, adds = paths["factored_macs"] + transform_macs, paths["factored_adds"]
    else:
        macs, adds = dense, 0
    return CostTerms(
        params=built_params(layer, params), macs=macs, dense_macs=dense, adds=adds,
        implementation=implementation, transform_params=transform_params,
        transform_macs=transform_macs,
    )


def filter_basis_nonzeros(transform_conv, coefficients, basis, params, macs, input_shape):
    """`(nonzeros, nonzero_macs)` of a `TransformConv2D` whose bases are in a filter basis.

    Args:
        transform_conv: the `TransformConv2D` (its path and product count).
        coefficients: `(kh * kw, c_in, bases)` array, the bases' coefficients.
        basis: `(basis_groups, kh * kw, kh * kw)` array, the basis filters.
        params: the layer's parameters with the coefficients dense.
        macs: the layer's multiply-adds with the coefficients dense.
        input_shape: its input shape without the batch dimension.

    Returns:
        `params` less the coefficients' zeros, and, on the factored path, the
        products with only the nonzero coefficients, the basis's nonzero taps
        turning them into tap products (as the TFLite form computes), and
        the rest of the path (on the materialised path, `macs`).
    """
    nnz = int(np.count_nonzero(coefficients))
    nonzeros = params - (coefficients.size - nnz)
    if transform_conv.implementation_used != "factored":  # the dense kernel, from the bases
        return nonzeros, macs
    products = transform_conv.cost(input_shape)["factored_macs"]
    c, n = coefficients.shape[1], coefficients.shape[-1]
    taps = coefficients.shape[0]
    pixels = products // (c * taps * n)
    g, basis_groups = transform_conv.depth_groups, basis.shape[0]
    mixing = pixels * n * (g // basis_groups) * int(np.count_nonzero(basis))
    return nonzeros, macs - products + products * nnz // coefficients.size + mixing


@register_layer_cost(TransformConv2D, check_input=check_image_input)
def _transform_conv_rule(layer, input_shape, output_shape):
    return transform_conv_cost(layer, input_shape, output_shape)


@register_layer_cost(FilterBasisTransformConv2D, check_input=check_image_input)
def _filter_basis_transform_conv_rule(layer, input_shape, output_shape):
    terms = transform_conv_cost(layer, input_shape, output_shape)
    if not layer.built:
        return terms
    kh, kw, c, n = layer.base_kernel.shape
    coefficients = np.asarray(layer.base_kernel).reshape(kh * kw, c, n)
    nonzeros, nonzero_macs = filter_basis_nonzeros(
        layer, coefficients, np.asarray(layer.basis_filters), terms.params, terms.macs,
        input_shape)
    return terms.replace(nonzeros=nonzeros, nonzero_macs=nonzero_macs)


@register_layer_cost(FilterBasisConv2D)
def _filter_basis_conv_rule(layer, input_shape, output_shape):
    """Its two stages: the depthwise basis convolution, then the coefficients' 1x1
    stage over the `c_in * kh * kw` responses (densified)."""
    c = image_dims(layer, input_shape)[2]
    oh, ow, _ = image_dims(layer, output_shape, what="output")
    kh, kw = layer.kernel_size
    taps = kh * kw
    groups, filters = layer.depth_groups, layer.filters
    params = kh * kw * groups * taps + c * taps * filters + (filters if layer.use_bias else 0)
    macs = oh * ow * c * taps * (kh * kw + filters)
    terms = CostTerms(built_params(layer, params), macs, dense_macs=oh * ow * kh * kw * c * filters)
    if not layer.built:
        return terms
    coefficients, basis = np.asarray(layer.coefficients), np.asarray(layer.basis)
    return terms.replace(**sparse_basis_terms(terms.params, coefficients, basis, groups, oh, ow))


def sparse_basis_terms(params, coefficients, basis, depth_groups, oh, ow):
    """`nonzeros` and `nonzero_macs` of a convolution in a filter basis (interspace pruning).

    Both stages with only the nonzero basis taps and coefficients.

    Args:
        params: its parameters with the coefficients dense.
        coefficients: `(kh * kw, c_in, filters)` array.
        basis: the basis filters (any shape; its nonzeros count).
        depth_groups: the number of bases.
        oh: the output's rows.
        ow: the output's columns.
    """
    c = coefficients.shape[1]
    nnz = int(np.count_nonzero(coefficients))
    zeros = coefficients.size - nnz
    sparse = oh * ow * (c // depth_groups * int(np.count_nonzero(basis)) + nnz)
    return {"nonzeros": params - zeros, "nonzero_macs": sparse}


@register_layer_cost(ChannelPad)
@register_layer_cost(ChannelGather)
def _channel_move_cost(layer, input_shape, output_shape):
    """Zero-padding or reordering channels: copies, no multiply-adds."""
    return CostTerms(params=layer.count_params(), macs=0)
