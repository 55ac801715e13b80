"""Pruning policies: which layers a model's pruning wraps, and whether the model suits it.

`PruningPolicy` is tfmot's contract (`allow_pruning(layer)`,
`ensure_model_supports_pruning(model)`); `PruneForLatencyOnXNNPack` prunes
only the 1x1 `Conv2D` layers, after checking that the model has the shape
XNNPACK's sparse inference runs: from every input, a 3x3 stride-2 `Conv2D`
on 3 channels (`"valid"` padding after a `ZeroPadding2D` of 1), then only
layers that sparse inference supports, up to a `GlobalAveragePooling2D`
(`keepdims=True`) on every output branch.
"""

import abc

import keras

__all__ = ["PruneForLatencyOnXNNPack", "PruningPolicy"]


class PruningPolicy(abc.ABC):
    """Which layers `prune_low_magnitude` wraps, and a check of the whole model first (tfmot's API).

    Subclass it and implement both methods; pass an instance as
    `tf_transform_conv.sparsity.prune_low_magnitude(..., pruning_policy=)`.
    """

    @abc.abstractmethod
    def allow_pruning(self, layer):
        """Whether `layer` gets a pruning wrapper."""
        raise NotImplementedError("Must be implemented in subclasses.")

    @abc.abstractmethod
    def ensure_model_supports_pruning(self, model):
        """Raises a ValueError if `model` does not suit the policy."""
        raise NotImplementedError("Must be implemented in subclasses.")


def _producers(layer):
    return {parent.operation for node in layer._inbound_nodes for parent in node.parent_nodes}


def _consumers(layer):
    return [node.operation for node in layer._outbound_nodes]


def _lookup(sources, stop, step):
    """The layers where `stop` holds, reached from `sources` through `step`; empty
    if some path ends without one (tfmot's traversal)."""
    to_visit, seen, found = set(sources), set(sources), set()
    while to_visit:
        layer = to_visit.pop()
        if stop(layer):
            found.add(layer)
            continue
        following = step(layer)
        if not following:
            return set()
        for nxt in following:
            if nxt not in seen:
                seen.add(nxt)
                to_visit.add(nxt)
    return found


def _single_zero_padding(layer):
    producers = list(_producers(layer))
    if len(producers) == 1 and isinstance(producers[0], keras.layers.ZeroPadding2D):
        return producers[0]
    return None


def _padding_is(pad, amount):
    return pad is not None and tuple(map(tuple, pad.padding)) == ((amount, amount),) * 2


class PruneForLatencyOnXNNPack(PruningPolicy):
    """Prunes only 1x1 `Conv2D` layers, in a model XNNPACK's sparse inference can run (tfmot's policy).

    `ensure_model_supports_pruning` follows tfmot's rules (see the module
    docstring); in a Keras 3 model the operations of `keras.ops` on
    symbolic tensors (`x + y`, `x * y`, `x - y`) count as the `add`,
    `multiply` and `subtract` it allows. Whether the interpreter then runs
    the file sparsely depends on the interpreter (see the sparse inference
    benchmark page).
    """

    def allow_pruning(self, layer):
        """Only `Conv2D` layers with a 1x1 kernel."""
        return (isinstance(layer, keras.layers.Conv2D)
                and tuple(layer.kernel_size) == (1, 1))

    def _starts(self, layer):
        if not isinstance(layer, keras.layers.Conv2D) or not getattr(layer, "built", False):
            return False
        return (tuple(layer.kernel.shape[:3]) == (3, 3, 3) and tuple(layer.strides) == (2, 2)
                and layer.padding == "valid" and _padding_is(_single_zero_padding(layer), 1))

    def _supported(self, layer):
        inner = getattr(layer, "layer", None)
        if inner is not None and isinstance(layer, keras.layers.Wrapper):
            return self._supported(inner)
        if isinstance(layer, (keras.layers.Add, keras.layers.Multiply,
                              keras.layers.ZeroPadding2D, keras.layers.ReLU,
                              keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Dropout)):
            return True
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            pad = _single_zero_padding(layer)
            size, strides = tuple(layer.kernel_size), tuple(layer.strides)
            cases = [
                size == (3, 3) and strides == (1, 1) and layer.padding == "same",
                size == (3, 3) and strides in ((1, 1), (2, 2)) and layer.padding == "valid"
                and _padding_is(pad, 1),
                size == (5, 5) and strides == (1, 1) and layer.padding == "same",
                size == (5, 5) and strides in ((1, 1), (2, 2)) and layer.padding == "valid"
                and _padding_is(pad, 2),
            ]
            return (layer.depth_multiplier == 1 and tuple(layer.dilation_rate) == (1, 1)
                    and any(cases))
        if isinstance(layer, keras.layers.Conv2D):
            return (layer.groups == 1 and tuple(layer.dilation_rate) == (1, 1)
                    and tuple(layer.kernel_size) == (1, 1) and tuple(layer.strides) == (1, 1))
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return bool(layer.keepdims)
        if isinstance(layer, keras.layers.BatchNormalization):
            return layer.axis in (3, -1, [3], [-1])
        if isinstance(layer, keras.layers.UpSampling2D):
            return layer.interpolation == "bilinear"
        if isinstance(layer, keras.layers.Activation):
            return getattr(layer.activation, "__name__", "") in (
                "relu", "relu6", "leaky_relu", "elu", "sigmoid")
        return type(layer).__name__ in ("Add", "Subtract", "Multiply", "Identity")

    def ensure_model_supports_pruning(self, model):
        """Raises a ValueError unless `model` has the shape sparse inference runs (module docstring)."""
        if not (isinstance(model, keras.Sequential) or hasattr(model, "_operations")) or (
                not model.built):
            raise ValueError(
                "PruneForLatencyOnXNNPack checks a built Sequential or Functional model. "
                f"Received {type(model).__name__} (built={model.built}).")
        inputs = {t._keras_history.operation for t in model.inputs}
        starts = _lookup(inputs, self._starts, _consumers)
        if not starts:
            raise ValueError(
                "PruneForLatencyOnXNNPack found no 3x3 Conv2D with stride 2, 3 input "
                "channels and 'valid' padding after a ZeroPadding2D of 1 on every input "
                "branch: XNNPACK's sparse inference starts there.")
        outputs = {t._keras_history.operation for t in model.outputs}
        ends = _lookup(outputs, lambda layer: isinstance(
            layer, keras.layers.GlobalAveragePooling2D), lambda layer: list(_producers(layer)))
        if not ends:
            raise ValueError(
                "PruneForLatencyOnXNNPack found no GlobalAveragePooling2D on every output "
                "branch: XNNPACK's sparse inference ends there.")

        def visit(layer):
            if layer not in ends and not self._supported(layer):
                raise ValueError(
                    f"Layer '{layer.name}' ({type(layer).__name__}) is not supported by "
                    "XNNPACK's sparse inference (PruneForLatencyOnXNNPack): between the "
                    "first 3x3 convolution and the GlobalAveragePooling2D it allows 1x1 "
                    "Conv2D, 3x3 and 5x5 DepthwiseConv2D, BatchNormalization, ReLU-type "
                    "activations, ZeroPadding2D, Add, Multiply and Dropout.")
            return layer in ends

        _lookup([c for layer in starts for c in _consumers(layer)], visit, _consumers)
