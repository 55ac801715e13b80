"""`PrunableLayer`: the contract by which a custom layer says which of its weights to prune.

A layer that derives from `PrunableLayer`, or simply has a
`get_prunable_weights()` method (as tfmot's contract allows), is wrapped by
`MagnitudePruning` like a built-in one: each weight it returns gets its own
mask, ranked and pruned by the same schedule, and kept at zero through
training; the layer computes with its own `call` on the masked weights.
"""

import abc

__all__ = ["PrunableLayer", "is_prunable_layer"]


class PrunableLayer(abc.ABC):
    """Mix-in for a custom Keras layer that names the weights to prune (tfmot's contract).

    Derive from it beside `keras.layers.Layer` and implement
    `get_prunable_weights()`; `prune_low_magnitude` (this package's and
    `tf_transform_conv.sparsity`'s) then wraps the layer in
    `MagnitudePruning`, in a model or alone.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> class Scale(keras.layers.Layer, tc.sparsity.PrunableLayer):
    ...     def build(self, input_shape):
    ...         self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")
    ...     def call(self, x):
    ...         return x * self.w
    ...     def get_prunable_weights(self):
    ...         return [self.w]
    >>> wrapper = tc.prune_low_magnitude(Scale(), lambda step: (True, 0.5))
    >>> model = keras.Sequential([keras.Input((4,)), wrapper])
    >>> _ = wrapper.layer.w.assign([1.0, 4.0, 2.0, 3.0])
    >>> _ = tc.update_pruning_step(model, 0)
    >>> np.asarray(wrapper.layer.w).tolist()
    [0.0, 4.0, 0.0, 3.0]
    """

    @abc.abstractmethod
    def get_prunable_weights(self):
        """The layer's weight variables to prune (a list, built weights)."""
        raise NotImplementedError("Must be implemented in subclasses.")


def is_prunable_layer(layer):
    """Whether `layer` follows the `PrunableLayer` contract (the class, or the method)."""
    return isinstance(layer, PrunableLayer) or callable(
        getattr(layer, "get_prunable_weights", None))
