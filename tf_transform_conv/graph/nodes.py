"""A model's graph: which models have one, and their layer calls in running order.

`is_graph_model` / `check_graph_model` say whether a model can be walked and
rewritten (a built Sequential or Functional one: a subclassed model has no
graph), and `graph_nodes` lists a model's layer calls, every producer before
its readers: what cost accounting, the channel analyses and the export pass
walk.
"""

import os

import keras

from tf_transform_conv import _compat


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
