"""What a model and a path must be for export: built with static inputs, stripped, writable."""

import os
import tempfile

from tf_transform_conv import _compat
from tf_transform_conv.graph.nodes import is_graph_model
from tf_transform_conv.pruning.wrapper import PruningWrapper

__all__ = [
    "check_folder",
    "check_no_wrappers",
    "check_static_inputs",
    "check_writable",
    "flat_inputs",
    "inputs_struct",
    "unknown_input_dims",
]


def flat_inputs(model):
    """The model's input tensors, as a list."""
    return list(model.inputs)


def inputs_struct(model):
    """The model's inputs in the structure it is called with (one tensor, a list, a dict)."""
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return struct
    inputs = flat_inputs(model)
    return inputs[0] if len(inputs) == 1 else inputs


def check_no_wrappers(model, verb):
    """Raises a ValueError naming the pruning wrappers a model still holds (strip it first)."""
    wrappers = [
        layer.name
        for layer in _compat.layers_of(model)
        if isinstance(layer, PruningWrapper)
    ]
    if wrappers:
        raise ValueError(
            f"{verb} needs a stripped model: this one still holds pruning "
            f"wrappers {wrappers}, whose dense kernel would be exported; strip "
            "first: tf_transform_conv.strip_model(model), then export the result."
        )


def unknown_input_dims(model):
    """`(name, shape)` of the model inputs with an unknown non-batch dimension."""
    if not getattr(model, "inputs", None):
        return [(model.name, None)]
    return [
        (getattr(t, "name", "?"), tuple(t.shape))
        for t in flat_inputs(model)
        if any(d is None for d in tuple(t.shape)[1:])
    ]


def check_static_inputs(model, verb):
    """Raises a ValueError unless the model is built with every input dimension known but the batch."""
    if not getattr(model, "built", False) or not getattr(model, "inputs", None):
        kind = (
            f"{type(model).__name__} is a subclassed model, which has no input "
            "signature to export"
            if model.built and not is_graph_model(model)
            else "the model is not built"
        )
        raise ValueError(
            f"{verb} needs a built model with known inputs; {kind}. Build it as a "
            "Functional model, or a Sequential model starting with "
            "keras.Input((H, W, C))."
        )
    unknown = unknown_input_dims(model)
    if unknown:
        raise ValueError(
            f"{verb} needs fully known input dimensions apart from the batch "
            f"(the factored TransformConv2D path and the TFLite file have a fixed "
            f"size). Received inputs {unknown}. Rebuild the model on "
            "keras.Input((H, W, C)) at the deployment size and copy the weights "
            "(they do not depend on the spatial size), then export that model."
        )


def check_writable(path, verb):
    """`path` as a str; a ValueError unless a file can be written there."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{verb} writes a file; {path!r} is a directory. Pass a file path "
            "such as 'model.tflite'."
        )
    folder = os.path.dirname(os.path.abspath(path))
    check_folder(folder, path, verb)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tfconv-write-test-"):
            pass
    except OSError as e:
        raise ValueError(
            f"{verb} cannot write {path!r}: the folder {folder!r} is not writable "
            f"({e.strerror or e}). Pick a folder you can write to."
        ) from None
    return path


def check_folder(folder, path, verb):
    """Raises a ValueError unless `folder` (the parent of `path`) is an existing folder."""
    if os.path.isdir(folder):
        return
    if os.path.exists(folder):
        raise ValueError(
            f"{verb} cannot write {path!r}: {folder!r} is a file, not a folder. "
            "Pick a path inside an existing folder."
        )
    raise ValueError(
        f"{verb} cannot write {path!r}: the folder {folder!r} does not exist. "
        "Create it first (os.makedirs(folder, exist_ok=True)) or pick another path."
    )
