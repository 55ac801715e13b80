"""Rewriting Keras models layer by layer: what `transform_model`, `prune_model`, export and `models` share.

`check_graph_model` says whether a model can be rewritten (a built
Sequential or Functional one), `check_transforms` / `check_options` check the
options `transform_model` and `prune_model` share, `select_layers` resolves
their `layers` argument, `skip_reason` / `shape_skip_reason` say why a
convolution cannot become a `TransformConv2D`, `graph_nodes` lists a
model's layer nodes producers first (what `cost`, `structured` and
`channel_order` walk), `CHANNELWISE_LAYERS` / `ELEMENTWISE_MERGES` are the
layers those passes let channels through, and `rewrite_model` clones a
model, replacing the layers a function chooses while every other layer keeps
its weights.
"""

import os
import warnings

import keras

from tf_transform_conv import _compat
from tf_transform_conv._checks import check_bool
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv import families as families_lib
from tf_transform_conv import transforms as transforms_lib
from tf_transform_conv.assignment import CRITERIA
from tf_transform_conv.assignment import check_selection


def is_graph_model(model):
    """Whether `model` is a Sequential or Functional model.

    Functional is what `keras.Model(inputs, outputs)` builds; subclassed
    models have no graph to rewrite.
    """
    return isinstance(model, keras.Sequential) or _compat.is_functional(model)


def check_graph_model(model, verb, subclassed_advice=None):
    """Raises a ValueError saying what `verb` needs, unless `model` is a built graph model.

    A graph model is a Sequential or Functional one: subclassed models have
    no graph to rewrite.

    Args:
        model: what the caller was given.
        verb: the caller's name, for the messages.
        subclassed_advice: optional `model -> str`, what to do instead with
            a subclassed model; by default, to replace or wrap its `Conv2D`
            layers in its own code.
    """
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        raise ValueError(
            f"{verb} needs a built keras.Model (Sequential or Functional). Received "
            f"the path model={path!r}: load the model first, "
            f"model = keras.saving.load_model({path!r})."
        )
    if not isinstance(model, keras.Model):
        hint = (
            ": a layer; put it in a model, keras.Sequential([keras.Input(shape), layer])"
            if isinstance(model, keras.layers.Layer) else ""
        )
        raise ValueError(
            f"{verb} needs a built keras.Model (Sequential or Functional). Received "
            f"an object of type {type(model).__name__}{hint}."
        )
    if not is_graph_model(model):
        if subclassed_advice is not None:
            advice = subclassed_advice(model)
        else:
            convs = [
                layer.name
                for layer in _compat.layers_of(model)
                if isinstance(layer, keras.layers.Conv2D)
            ]
            advice = (
                "Replace or wrap its Conv2D layers in its own code instead "
                "(TransformConv2D, or TransformPruning(layer, schedule)): candidates "
                f"here are {convs}."
            )
        raise ValueError(
            f"{verb} rewrites Sequential and Functional models; "
            f"{type(model).__name__} is a subclassed model. {advice}"
        )
    if not model.built:
        raise ValueError(
            f"{verb} needs a built model, and {type(model).__name__} '{model.name}' is "
            "not built: its input shape is unknown. Give it an input, "
            "keras.Sequential([keras.Input((rows, cols, channels)), ...]), or call "
            "model.build((None, rows, cols, channels)) first."
        )


def check_transforms(transforms, kernel_size=None):
    """The names of `transforms`; they must include `"identity"` (a kept filter is its own base)."""
    names = transforms_lib.resolve_transforms(transforms, kernel_size)
    if "identity" not in names:
        raise ValueError(
            "`transforms` must include 'identity' (a kept filter is its own "
            f"base). Received transforms={list(names)}."
        )
    return names


def check_options(transforms, criterion, depth_groups, scale, transform_family,
                  allocation, min_bases, assign, subtract_mean):
    """Raises a ValueError naming the first invalid option of `transform_model` / `prune_model`.

    Returns:
        The transform names.
    """
    names = check_transforms(transforms)
    if criterion not in CRITERIA:
        raise ValueError(
            "Invalid value for argument `criterion`. Expected one of "
            f"{list(CRITERIA)}. Received criterion={criterion!r}."
        )
    check_positive_int(depth_groups, "depth_groups")
    check_bool(scale, "scale")
    families_lib.check_family(transform_family)
    check_selection(allocation, min_bases, assign, subtract_mean)
    return names


def select_layers(model, layers, eligible):
    """The names of the layers of `model` that `layers` chooses among `eligible` ones.

    Args:
        layers: None (every eligible layer), a name or list of names, a layer
            class or tuple of classes, or a predicate `layer -> bool`.
    """
    candidates = [
        layer
        for layer in _compat.layers_of(model)
        if eligible(layer)
    ]
    classes = isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    )
    names = [layers] if isinstance(layers, str) else layers
    if not (
        layers is None or classes or callable(layers)
        or (isinstance(names, (list, tuple, set)) and all(isinstance(n, str) for n in names))
    ):
        raise ValueError(
            "Invalid value for argument `layers`. Expected None (every eligible "
            "layer), a layer name or a list of names, a layer class (or a tuple "
            f"of classes) or a predicate `layer -> bool`. Received layers={layers!r}."
        )
    if layers is None:
        return {layer.name for layer in candidates}
    if classes:
        return {layer.name for layer in candidates if isinstance(layer, layers)}
    if callable(layers):
        return {layer.name for layer in candidates if layers(layer)}
    eligible_names = {layer.name for layer in candidates}
    missing = [name for name in names if name not in eligible_names]
    if missing:
        raise ValueError(
            f"No eligible layer is named {missing}. Eligible layers are "
            f"{sorted(eligible_names)}."
        )
    return set(names)


# The convolutions a report lists, converted or not.
CONVOLUTIONS = (
    keras.layers.Conv2D,
    keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv2D,
    keras.layers.Conv2DTranspose,
)


def skip_reason(layer, transforms):
    """Why `layer` cannot become a `TransformConv2D` ("" when it can)."""
    if isinstance(layer, keras.layers.SeparableConv2D):
        return "separable convolution: not supported"
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise convolution: each filter sees its own channel, no filters to share"
    if isinstance(layer, keras.layers.Conv2DTranspose):
        return "transposed convolution: not supported"
    if not isinstance(layer, keras.layers.Conv2D):
        return "not a Conv2D"
    return shape_skip_reason(layer.kernel_size, layer.groups, transforms)


def shape_skip_reason(kernel_size, groups, transforms):
    """Why a `Conv2D` of this shape cannot be a `TransformConv2D` ("" when it can)."""
    kernel_size = tuple(kernel_size)
    if groups != 1:
        return f"grouped convolution (groups={groups}): not supported"
    if kernel_size == (1, 1):
        return "1x1 kernel: spatial transforms are meaningless"
    try:
        transforms_lib.resolve_transforms(transforms, kernel_size)
    except ValueError as e:
        return f"kernel {kernel_size}: {e}"
    return ""


def layer_depth_groups(layer, depth_groups):
    """`depth_groups`, or 1 where it does not divide the layer's input channels (an RGB stem)."""
    channels = layer.kernel.shape[2]
    return depth_groups if channels % depth_groups == 0 else 1


# Layers that act on each channel separately at inference, without weights
# (pooling and padding only in channels_last, which callers check).
CHANNELWISE_LAYERS = (
    keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
    keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
    keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.UpSampling2D,
    keras.layers.Identity, keras.layers.ActivityRegularization,
)
# Merges that combine their inputs channel by channel.
ELEMENTWISE_MERGES = (
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
    keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
)


def graph_nodes(model):
    """The layer nodes of a built Functional or Sequential model, every producer
    before its readers (a post-order walk from the outputs; input layers left out).

    Raises:
        ValueError: for a model that is not built, or has no graph (subclassed).
    """
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built. Call it on an input, or call "
            "build(input_shape), before model_cost()."
        )
    try:
        outputs, inputs = model.outputs, model.inputs
    except (AttributeError, ValueError):
        outputs = inputs = None
    if not outputs:
        raise ValueError(
            f"model_cost() needs a Functional or Sequential model, whose graph "
            f"it walks. Model '{model.name}' ({type(model).__name__}) has no "
            "graph (a subclassed model?): call layer_cost() on each of its "
            "layers with that layer's input shape instead."
        )
    input_ids = {id(t) for t in keras.tree.flatten(inputs)}
    done, order = set(), []
    stack = [
        (_compat.producer_node(t), False) for t in reversed(keras.tree.flatten(outputs))
    ]
    while stack:
        node, expanded = stack.pop()
        if id(node) in done:
            continue
        if expanded:
            done.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for tensor in reversed(node.input_tensors):
            if id(tensor) in input_ids:
                continue
            parent = _compat.producer_node(tensor)
            if id(parent) not in done:
                stack.append((parent, False))
    return order


def rewrite_model(model, replace):
    """Clones `model` (nested models included), every layer keeping its weights.

    Args:
        replace: `layer -> None | (new_layer, weights)`; a layer for which it
            returns a pair is replaced by `new_layer`, which then gets
            `weights` (or keeps its own when `weights` is None).
    """
    weights = {}

    def clone_function(layer):
        result = replace(layer)
        if result is not None:
            new, new_weights = result
        else:
            new = layer.__class__.from_config(layer.get_config())
            new_weights = layer.get_weights() if layer.weights else None
        if new_weights is not None:
            weights[id(new)] = new_weights
        return new

    # Keras recompiles a clone from the compile config, which fails on a
    # loss or metric that is not registered for serialisation: clone the
    # layers uncompiled, then carry the compile settings over where they can be.
    compiled = getattr(model, "compiled", False)
    try:
        model.compiled = False
        clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    finally:
        model.compiled = compiled
    for layer in _compat.layers_of(clone):
        if id(layer) in weights:
            layer.set_weights(weights[id(layer)])
    if compiled:
        try:
            clone.compile_from_config(model.get_compile_config())
        except (TypeError, ValueError) as error:
            warnings.warn(
                f"The rewritten model is not compiled: its compile settings could not "
                f"be rebuilt ({type(error).__name__}: {str(error).splitlines()[0]}). "
                "Compile it before fit() or evaluate().",
                stacklevel=3,
            )
    return clone
