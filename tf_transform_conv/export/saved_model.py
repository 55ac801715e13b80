"""SavedModel export: the factored rewrite, then `model.export`."""

import os

from tf_transform_conv.export.checks import check_folder
from tf_transform_conv.export.checks import check_no_wrappers
from tf_transform_conv.export.checks import unknown_input_dims
from tf_transform_conv.export.deploy import factored_model

__all__ = ["export_saved_model"]


def export_saved_model(model, path):
    """Writes `model` as a TensorFlow SavedModel with factored `TransformConv2D`s.

    A thin wrapper: `factored_model(model).export(path)`. The SavedModel
    stores the variables (the bases) either way; the rewrite makes the
    serving graph run the factored path. Its `serve` endpoint takes a batch
    of any size. A model whose inputs have an unknown spatial size is
    exported as it is (its `TransformConv2D`s then run the path they chose
    at build, materialised for unknown sizes).

    Args:
        model: a built Sequential or Functional Keras model, stripped of
            pruning wrappers (`strip_model`).
        path: the SavedModel directory to write.

    Returns:
        `path`.

    Raises:
        ValueError: if the model holds pruning wrappers, or
            `path`'s parent folder is missing or not writable.

    Load and serve it with `loaded = tf.saved_model.load(path)`, then
    `loaded.serve(x)` (keep `loaded`: its functions read its variables,
    which go with it).
    """
    verb = "export_saved_model"
    path = os.fspath(path)
    check_folder(os.path.dirname(os.path.abspath(path)), path, verb)
    check_no_wrappers(model, verb)
    deployed = model if unknown_input_dims(model) else factored_model(model)
    deployed.export(path, verbose=False)
    return path
