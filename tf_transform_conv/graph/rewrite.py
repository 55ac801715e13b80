"""Rewriting Keras models layer by layer: cloning with some layers replaced, and choosing layers.

`rewrite_model` clones a model (nested models included), replacing the
layers a function chooses while every other layer keeps its weights: what
conversion, pruning, stripping, structured removal and export are built on.
`select_layers` resolves the `layers` argument every verb takes (names,
classes or a predicate), and `unless_wrapped` makes a layer that a wrapper
already holds ineligible, saying so.
"""

import warnings

import keras

from tf_transform_conv import _compat


def select_layers(model, layers, skip_reason):
    """The names of the layers of `model` that `layers` chooses among the eligible ones.

    Args:
        layers: None (every eligible layer), a name or list of names, a layer
            class or tuple of classes, or a predicate `layer -> bool`.
        skip_reason: `layer -> str`, why a layer is not eligible ("" when it
            is); a name in `layers` for a layer that is not eligible raises
            with it.
    """
    candidates = [
        layer
        for layer in _compat.layers_of(model)
        if not skip_reason(layer)
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
        by_name = {layer.name: layer for layer in _compat.layers_of(model)}
        why = "; ".join(
            f"{name!r}: {skip_reason(by_name[name])}" if name in by_name
            else f"{name!r}: no layer of model '{model.name}' has this name"
            for name in missing
        )
        raise ValueError(
            f"No eligible layer is named {missing} ({why}). Eligible layers are "
            f"{sorted(eligible_names)}."
        )
    return set(names)


def unless_wrapped(model, skip_reason):
    """`skip_reason` for `select_layers` that also refuses the layers a wrapper of
    `model` already holds (a `keras.layers.Wrapper`: a pruning wrapper)."""
    holders = {
        id(layer.layer): type(layer).__name__
        for layer in _compat.layers_of(model)
        if isinstance(layer, keras.layers.Wrapper)
    }

    def reason(layer):
        if id(layer) in holders:
            return f"already wrapped by {holders[id(layer)]}"
        return skip_reason(layer)

    return reason


def rewrite_model(model, replace):
    """Clones `model` (nested models included), every layer keeping its weights.

    `Lambda` layers are not rebuilt: the clone calls them as they are (they
    hold no weights, and rebuilding their function from its config would need
    unsafe deserialisation).

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
        elif isinstance(layer, keras.layers.Lambda):
            # Rebuilt from its config, a Lambda's function would go through Keras's
            # safe-mode check on deserialisation, though nothing is loaded: the
            # clone calls the same layer (it holds no weights).
            return layer
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
