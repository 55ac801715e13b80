"""`TransformPruning`: trains a `Conv2D` toward a `TransformConv2D` under a pruning schedule.

During training, the step callback (`UpdateTransformPruningStep`) asks the
wrapper's schedule (tfmot's `PolynomialDecay` / `ConstantSparsity`, or any
callable `schedule(step) -> (should_prune, sparsity)`) whether to prune. At a
pruning step the wrapper keeps `n = filters - floor(s * filters + 1/2)`
filters (at least one) as *bases* and replaces every other filter by the
`(base, transform, scale)` that reconstructs it best, as its `Reconstruction`
says (`ops.assignment.fit_assignment`). Between pruning steps the layer
convolves with the *effective* kernel: kept filters as they are, replaced
filters rebuilt from their bases, so gradients reach each base through every
filter built from it. `strip()` gives the compact `TransformConv2D` that
computes the same outputs.
"""

import keras
import numpy as np
from keras import ops

from tf_transform_conv.convert import transform_conv_from_conv2d
from tf_transform_conv.cost import conv2d_cost
from tf_transform_conv.cost import register_layer_cost
from tf_transform_conv.cost.keras_layers import check_image_input
from tf_transform_conv.ops import families as families_lib
from tf_transform_conv.ops import transforms as transforms_lib
from tf_transform_conv.ops.assignment import kept_filters
from tf_transform_conv.pruning.wrapper import PruningWrapper
from tf_transform_conv.reconstruction import Reconstruction
from tf_transform_conv.reconstruction import check_transforms
from tf_transform_conv.saliency import filter_saliency

__all__ = ["TransformPruning"]

_TAYLOR_NEEDS_DATA = (
    "Layer '{name}' ranks filters by their first-order (Taylor) saliency, which "
    "needs gradients on data: pass UpdateTransformPruningStep(saliency_data=...) "
    "(or scores= to update_pruning_step in a custom loop)."
)


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class TransformPruning(PruningWrapper):
    """Trains a `Conv2D` toward a `TransformConv2D` under a pruning schedule.

    The wrapped convolution keeps all its filters; a boolean state marks which
    are *reconstructed*. At each pruning step (driven by the
    `UpdateTransformPruningStep` callback) the wrapper keeps
    `kept_filters(filters, sparsity)` filters and gives every other filter the
    `(base, transform, scale)` that reconstructs it best. Sparsity never
    decreases and a replaced filter stays replaced; its own weights are no
    longer used. The layer computes `conv(x, effective_kernel()) + bias`.
    With a learned `transform_family` each reconstructed filter is
    `scale * L(phi) @ T(base)` with trainable parameters `phi`, which start,
    at the pruning step that replaces the filter, at their least-squares fit
    to it. With `criterion="taylor"` the filters are ranked by their
    first-order saliency `|sum(w * dL/dw)|`, which
    `UpdateTransformPruningStep(saliency_data=...)` accumulates over a few
    batches at each pruning step. With `allocation="global"` one ranking over
    every global wrapper of the model reaches the schedule's sparsity overall,
    each layer keeping at least `min_bases` and never more than it keeps
    (`ops.assignment.allocate_globally`).

    Args:
        layer: the `keras.layers.Conv2D` to wrap (`groups=1`, a kernel
            larger than 1x1).
        schedule: a pruning schedule, a callable `schedule(step) ->
            (should_prune: bool, sparsity: float in [0, 1))`: tfmot's
            `PolynomialDecay` and `ConstantSparsity` as they are, a function,
            or an object with `__call__(self, step)` (as tfmot's
            `PruningSchedule` subclasses). What it returns is checked at
            each evaluation.
        reconstruction: a `Reconstruction` (transforms, family, criterion,
            assignment, depth groups, scale, allocation, minimum bases), or
            None for its defaults. Its `depth_groups` must divide the layer's
            input channels (`prune_model` passes `reconstruction.for_layer`).
        **kwargs: base layer arguments.

    Raises:
        ValueError: for an invalid schedule or reconstruction, or a layer it
            cannot wrap.

    Example:

    >>> import keras, numpy as np
    >>> import tf_transform_conv as tc
    >>> conv = keras.layers.Conv2D(8, 3, name="conv")
    >>> wrapper = tc.TransformPruning(conv, lambda step: (True, 0.75),
    ...                               tc.Reconstruction(transforms="rotations"))
    >>> model = keras.Sequential([keras.Input((6, 6, 4)), wrapper])
    >>> tc.update_pruning_step(model, 0)
    ['transform_pruning_conv']
    >>> wrapper.kept.size, type(tc.strip_model(model).layers[0]).__name__
    (2, 'TransformConv2D')
    """

    def __init__(self, layer, schedule, reconstruction=None, **kwargs):
        kwargs.setdefault("name", f"transform_pruning_{layer.name}")
        super().__init__(layer, schedule, **kwargs)
        reconstruction = Reconstruction.get(reconstruction)
        reason = reconstruction.skip_reason(layer)
        if reason:
            raise ValueError(
                f"TransformPruning cannot wrap {type(layer).__name__} '{layer.name}': "
                f"{reason}. It wraps keras.layers.Conv2D layers with groups=1 and "
                "a kernel larger than 1x1."
            )
        self.reconstruction = reconstruction
        self.transforms = check_transforms(reconstruction.transforms, layer.kernel_size)

    # The settings, as the reconstruction gives them.

    @property
    def criterion(self):
        return self.reconstruction.criterion

    @property
    def allocation(self):
        return self.reconstruction.allocation

    @property
    def min_bases(self):
        return self.reconstruction.min_bases

    @property
    def depth_groups(self):
        return self.reconstruction.depth_groups

    @property
    def scale(self):
        return self.reconstruction.scale

    @property
    def transform_family(self):
        return self.reconstruction.transform_family

    def build(self, input_shape):
        super().build(input_shape)
        kh, kw, channels, filters = self.layer.kernel.shape
        if channels % self.depth_groups:
            raise ValueError(
                f"The input channels ({channels}) of layer '{self.layer.name}' "
                f"must be divisible by depth_groups={self.depth_groups}."
            )
        identity = self.transforms.index("identity")
        self._identity = identity
        self._tap_tables = transforms_lib.tap_tables(self.transforms, (kh, kw))
        self.reconstructed = self.add_weight(
            name="reconstructed", shape=(filters,), dtype="bool",
            initializer="zeros", trainable=False,
        )
        own = np.stack(
            [np.arange(filters), np.full(filters, identity)], axis=-1
        )
        self.assignment_table = self.add_weight(
            name="assignment", shape=(self.depth_groups, filters, 2), dtype="int32",
            initializer=keras.initializers.Constant(
                np.broadcast_to(own, (self.depth_groups, filters, 2))
            ),
            trainable=False,
        )
        self.filter_scale = self.add_weight(
            name="scale", shape=(filters,), initializer="ones",
            trainable=self.scale, dtype=self.layer.kernel.dtype,
        )
        self.transform_params = None
        if self.transform_family != "discrete":
            identity = families_lib.identity_params(self.transform_family, (kh, kw))
            self.transform_params = self.add_weight(
                name="transform", shape=(self.depth_groups, filters, len(identity)),
                initializer=keras.initializers.Constant(
                    np.tile(identity, (self.depth_groups, filters, 1))
                ),
                trainable=True, dtype=self.layer.kernel.dtype,
            )

    # -- the effective kernel ---------------------------------------------

    def effective_kernel(self, dtype=None):
        """Kept filters as they are; replaced filters as `scale * T(base)`."""
        kernel = self.layer.kernel
        dtype = dtype or kernel.dtype
        kernel = ops.cast(kernel, dtype)
        kh, kw, channels, filters = kernel.shape
        taps, g = kh * kw, self.depth_groups
        cg = channels // g
        table = ops.reshape(kernel, (taps, g, cg, filters))
        table = ops.reshape(ops.transpose(table, (0, 1, 3, 2)), (taps * g * filters, cg))
        table = ops.concatenate([table, ops.zeros((1, cg), dtype)], axis=0)
        assignment = ops.convert_to_tensor(self.assignment_table)
        src = ops.take(ops.convert_to_tensor(self._tap_tables), assignment[..., 1], axis=0)
        src = ops.transpose(src, (2, 0, 1))  # (taps, g, F)
        group = ops.reshape(ops.arange(g, dtype="int32"), (1, g, 1))
        rows = (src * g + group) * filters + assignment[None, ..., 0]
        rows = ops.where(src >= 0, rows, taps * g * filters)
        rebuilt = ops.take(table, rows, axis=0)  # (taps, g, F, cg)
        if self.transform_params is not None:
            work = "float64" if dtype == "float64" else "float32"
            coefficients = families_lib.coefficients(
                self.transform_family, ops.cast(self.transform_params, work), (kh, kw)
            )
            rebuilt = families_lib.apply_coefficients(
                rebuilt, ops.cast(coefficients, dtype), self.transform_family
            )
        rebuilt = ops.reshape(ops.transpose(rebuilt, (0, 1, 3, 2)), kernel.shape)
        rebuilt = rebuilt * ops.cast(self.filter_scale, dtype)
        return ops.where(ops.convert_to_tensor(self.reconstructed), rebuilt, kernel)

    def call(self, inputs, training=None):
        self.check_step_callback(training)
        conv = self.layer
        y = ops.conv(
            inputs,
            self.effective_kernel(self.compute_dtype),
            strides=conv.strides,
            padding=conv.padding,
            dilation_rate=conv.dilation_rate,
            data_format=conv.data_format,
        )
        if conv.use_bias:
            bias = ops.cast(conv.bias, y.dtype)
            if conv.data_format == "channels_first":
                bias = ops.reshape(bias, (1, -1, 1, 1))
            y = y + bias
        if conv.activation is not None:
            y = conv.activation(y)
        return y

    # -- pruning -------------------------------------------------------------

    @property
    def sparsity(self):
        """The fraction of filters currently reconstructed."""
        mask = np.asarray(self.reconstructed)
        return float(mask.mean())

    @property
    def kept(self):
        """Indices of the filters kept as bases."""
        return np.flatnonzero(~np.asarray(self.reconstructed))

    def saliency(self, scores=None):
        """The saliency of each filter (higher stays), as the criterion ranks them.

        The L2 norm (`"magnitude"` and `"reconstruction"`, whose global
        allocation ranks by it), the L1 norm (`"l1"`), or `scores`
        (`"taylor"`); minus the layer's mean over its kept filters with
        `subtract_mean`.
        """
        if self.criterion == "taylor" and scores is None:
            raise ValueError(_TAYLOR_NEEDS_DATA.format(name=self.name))
        kernel = keras.ops.convert_to_numpy(self.effective_kernel())
        return filter_saliency(kernel, self.criterion, scores,
                               self.reconstruction.subtract_mean, self.kept)

    def prune_to(self, sparsity=None, step=None, scores=None, count=None):
        """Keeps `kept_filters(filters, sparsity)` (or `count`) bases, never more than now, and refits."""
        filters = self.layer.filters
        current = self.kept
        wanted = count if count is not None else kept_filters(filters, sparsity)
        n = min(max(wanted, min(self.min_bases, filters)), len(current))
        if self.criterion == "taylor" and scores is None:
            raise ValueError(_TAYLOR_NEEDS_DATA.format(name=self.name))
        fit = self.reconstruction.fit(
            np.asarray(self.effective_kernel()), n, candidates=current, scores=scores)
        if sparsity is None:
            sparsity = 1.0 - n / filters
        bases = np.asarray(fit.bases)
        table = np.asarray(fit.assignment).copy()
        table[..., 0] = bases[table[..., 0]]
        mask = np.ones(filters, bool)
        mask[bases] = False
        self.assignment_table.assign(table.astype("int32"))
        self.filter_scale.assign(np.where(mask, fit.scale, 1.0).astype("float32"))
        if self.transform_params is not None:
            self.transform_params.assign(np.asarray(fit.transform_params, "float32"))
        self.reconstructed.assign(mask)
        self.pruning_history.append(
            {"step": step, "sparsity": sparsity, "kept": int(n), "error": float(fit.layer_error)}
        )

    def summary_scalars(self):
        return {"sparsity": self.sparsity, "reconstruction_error": self.reconstruction_error()}

    def reconstruction_error(self):
        """`||W - W_eff||_F / ||W||_F` over the wrapped kernel, replaced filters' own weights included."""
        w = np.asarray(self.layer.kernel, np.float64)
        eff = np.asarray(self.effective_kernel(), np.float64)
        norm = np.linalg.norm(w)
        return float(np.linalg.norm(w - eff) / norm) if norm else 0.0

    def strip(self):
        """The compact `TransformConv2D` computing what this wrapper computes, and its weights.

        Returns:
            `(layer, weights)`: an unbuilt `TransformConv2D` (the wrapped
            layer's name, padding, activation, ...; the kept filters as its
            bases) and the list of its weights. Build the layer (call it on
            an input, or `layer.build(input_shape)` with the wrapper's input
            shape), then `layer.set_weights(weights)`: it then computes what
            the wrapper computes. `strip_model` does this for every wrapper of
            a Sequential or Functional model.
        """
        conv = self.layer
        bases = self.kept
        position = np.full(conv.filters, -1)
        position[bases] = np.arange(len(bases))
        table = np.asarray(self.assignment_table).copy()
        table[..., 0] = position[table[..., 0]]
        # Kept filters: their own base under identity, scale 1.
        table[:, bases, 0] = np.arange(len(bases))
        table[:, bases, 1] = self._identity
        templates = np.broadcast_to(~np.asarray(self.reconstructed), table.shape[:2])
        weights = None
        if self.transform_params is not None:
            weights = np.asarray(self.transform_params)[~templates]
        return transform_conv_from_conv2d(
            conv,
            np.asarray(conv.kernel)[..., bases],
            table,
            self.transforms,
            # Kept filters use their own weights: scale 1, whatever an
            # optimiser's weight decay did to their (unused) scale entries.
            np.where(np.asarray(self.reconstructed), np.asarray(self.filter_scale), 1.0)
            if self.scale
            else None,
            self.transform_family,
            templates,
            weights,
        )

    def get_config(self):
        config = super().get_config()
        config["reconstruction"] = self.reconstruction.get_config()
        return config


def _check_wrapped_input(wrapper, input_shape):
    check_image_input(wrapper.layer, input_shape)


@register_layer_cost(TransformPruning, check_input=_check_wrapped_input)
def _transform_pruning_cost(wrapper, input_shape, output_shape):
    """What the wrapper computes: its wrapped convolution's multiply-adds with the
    effective kernel. Its parameters are the trainable ones: the wrapped kernel
    (every filter: replaced ones are variables until `strip_model` drops them)
    and bias, the filter scales with `scale=True`, and a learned family's
    transform parameters; the pruning state (step, mask, assignment) is not counted."""
    conv = wrapper.layer
    terms = conv2d_cost(conv, input_shape, output_shape)
    transform = 0
    if wrapper.transform_family != "discrete":
        transform = wrapper.depth_groups * conv.filters * families_lib.num_params(
            wrapper.transform_family, conv.kernel_size)
    params = terms.params + (conv.filters if wrapper.scale else 0) + transform
    return terms.replace(params=params, transform_params=transform)
