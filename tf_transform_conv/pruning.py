"""Training as generalised pruning.

`prune_model` wraps chosen `Conv2D` layers in `TransformPruning`. During
training, `UpdateTransformPruningStep` advances a step counter and asks each
wrapper's schedule (tfmot's `PolynomialDecay` / `ConstantSparsity`, or any
object with the contract `schedule(step) -> (should_prune, sparsity)`) whether
to prune. At a pruning step a wrapper keeps `n = filters - floor(s * filters
+ 1/2)` filters (at least one) as *bases* and replaces every other filter by
the `(base, transform, scale)` that reconstructs it best
(`tf_transform_conv.assignment.fit_assignment`). Between pruning steps the
layer convolves with the *effective* kernel: kept filters as they are,
replaced filters rebuilt from their bases, so gradients reach each base
through every filter built from it. `strip_model` turns each wrapper into
the compact `TransformConv2D` that computes the same outputs.

tfmot itself is never imported at import time (importing it switches
`tf.keras` to legacy Keras for the whole process); its schedule objects are
accepted as they are and rebuilt lazily when a saved model is loaded.
"""

import importlib
import math

import keras
import numpy as np
from keras import ops

from tf_transform_conv import families as families_lib
from tf_transform_conv import transforms as transforms_lib
from tf_transform_conv.assignment import CRITERIA
from tf_transform_conv.assignment import fit_assignment
from tf_transform_conv.convert import check_graph_model
from tf_transform_conv.convert import rewrite_model
from tf_transform_conv.convert import select_layers
from tf_transform_conv.convert import skip_reason
from tf_transform_conv.convert import transform_conv_from_conv2d

_TFMOT_SCHEDULES = ("PolynomialDecay", "ConstantSparsity")
_TFMOT_SCHEDULE_MODULE = (
    "tensorflow_model_optimization.python.core.sparsity.keras.pruning_schedule"
)


def kept_filters(filters, sparsity):
    """The number of bases kept at `sparsity`: `filters - floor(s * filters + 1/2)`, at least 1."""
    return max(1, filters - int(math.floor(sparsity * filters + 0.5)))


# ----------------------------------------------------------------------------
# Schedules


def serialize_schedule(schedule):
    """A JSON-able config for a schedule; see `deserialize_schedule`."""
    cls = type(schedule)
    if cls.__module__.startswith("tensorflow_model_optimization") and (
        cls.__name__ in _TFMOT_SCHEDULES
    ):
        return {"tfmot": cls.__name__, "config": schedule.get_config()["config"]}
    registered = keras.saving.get_registered_name(cls)
    if not hasattr(schedule, "get_config") or registered == cls.__name__:
        raise ValueError(
            f"The pruning schedule {schedule!r} cannot be saved. Use tfmot's "
            "PolynomialDecay or ConstantSparsity, or give your schedule class "
            "get_config() and from_config() and register it with "
            "@keras.saving.register_keras_serializable()."
        )
    return {"keras": keras.saving.serialize_keras_object(schedule)}


def deserialize_schedule(config):
    """Rebuilds a schedule saved by `serialize_schedule` (tfmot imported lazily)."""
    if "tfmot" in config:
        name = config["tfmot"]
        if name not in _TFMOT_SCHEDULES:
            raise ValueError(
                f"Unknown tfmot schedule {name!r}; expected one of {list(_TFMOT_SCHEDULES)}."
            )
        module = importlib.import_module(_TFMOT_SCHEDULE_MODULE)
        return getattr(module, name)(**config["config"])
    return keras.saving.deserialize_keras_object(config["keras"])


def _evaluate_schedule(schedule, step):
    should_prune, sparsity = schedule(step)
    should_prune = bool(np.asarray(should_prune))
    sparsity = float(np.asarray(sparsity))
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"The pruning schedule returned sparsity={sparsity} at step {step}; "
            "expected a value in [0, 1)."
        )
    return should_prune, sparsity


# ----------------------------------------------------------------------------
# The wrapper


def _check_wrappable(layer, transforms):
    reason = skip_reason(layer, transforms)
    if reason:
        raise ValueError(
            f"TransformPruning cannot wrap {type(layer).__name__} '{layer.name}': "
            f"{reason}. It wraps keras.layers.Conv2D layers with groups=1 and "
            "a kernel larger than 1x1."
        )


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class TransformPruning(keras.layers.Wrapper):
    """Trains a `Conv2D` toward a `TransformConv2D` under a pruning schedule.

    The wrapped convolution keeps all its filters; a boolean state marks which
    are *reconstructed*. At each pruning step (driven by the
    `UpdateTransformPruningStep` callback) the wrapper keeps
    `kept_filters(filters, sparsity)` filters and gives every other filter the
    `(base, transform, scale)` that reconstructs it best. Sparsity never
    decreases and a replaced filter stays replaced; its own weights are no
    longer used. The layer computes `conv(x, effective_kernel()) + bias`.

    Args:
        layer: the `keras.layers.Conv2D` to wrap (`groups=1`).
        schedule: a pruning schedule, `schedule(step) -> (should_prune,
            sparsity)`; tfmot's `PolynomialDecay` and `ConstantSparsity` as
            they are.
        transforms: preset or names (must contain `"identity"`). Defaults to
            `"d4"`.
        criterion: which filters stay bases: `"reconstruction"` (default) or
            `"l1"`.
        depth_groups: input channel groups with their own assignment.
        scale: whether reconstructed filters carry a trainable scale.
        transform_family: `"discrete"` (default) or a learned family
            (`"scalar"`, `"rotation"`, `"affine"`, `"general"`,
            `tf_transform_conv.families`): each reconstructed filter is then
            `scale * L(phi) @ T(base)` with trainable parameters `phi`, which
            start, at the pruning step that replaces the filter, at their
            least-squares fit to it.
        **kwargs: base layer arguments.
    """

    def __init__(
        self,
        layer,
        schedule,
        transforms="d4",
        criterion="reconstruction",
        depth_groups=1,
        scale=True,
        transform_family="discrete",
        **kwargs,
    ):
        kwargs.setdefault("name", f"transform_pruning_{layer.name}")
        super().__init__(layer, **kwargs)
        _check_wrappable(layer, transforms)
        if isinstance(schedule, dict):
            schedule = deserialize_schedule(schedule)
        if not callable(schedule):
            raise ValueError(
                "Expected `schedule` to be callable as schedule(step) -> "
                f"(should_prune, sparsity). Received schedule={schedule!r}."
            )
        if criterion not in CRITERIA:
            raise ValueError(
                f"Invalid value for argument `criterion`. Expected one of "
                f"{list(CRITERIA)}. Received criterion={criterion!r}."
            )
        if not isinstance(depth_groups, (int, np.integer)) or depth_groups < 1:
            raise ValueError(
                "Invalid value for argument `depth_groups`. Expected a "
                f"strictly positive int. Received depth_groups={depth_groups!r}."
            )
        self.schedule = schedule
        self.transforms = transforms_lib.resolve_transforms(transforms, layer.kernel_size)
        if "identity" not in self.transforms:
            raise ValueError(
                "`transforms` must include 'identity' (a kept filter is its own "
                f"base). Received transforms={list(self.transforms)}."
            )
        self.criterion = criterion
        self.depth_groups = int(depth_groups)
        self.scale = bool(scale)
        self.transform_family = families_lib.check_family(transform_family)
        self.step_callback_attached = False
        self.pruning_history = []  # (step, sparsity, kept, layer_error) per pruning step

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
        self.pruning_step = self.add_weight(
            name="pruning_step", shape=(), dtype="int64", initializer="zeros",
            trainable=False,
        )
        self.pruning_step.assign(-1)
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
        if training and not self.step_callback_attached:
            raise ValueError(
                f"Layer '{self.name}' is being trained without its pruning "
                "step callback. Pass "
                "`callbacks=[tf_transform_conv.UpdateTransformPruningStep()]` to "
                "`model.fit` (or, in a custom loop, call "
                "`update_pruning_step(model, step)` before each batch)."
            )
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

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

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

    def update(self, step):
        """Runs the schedule at `step`; prunes when it says so. Returns whether it pruned."""
        self.pruning_step.assign(step)
        should_prune, sparsity = _evaluate_schedule(self.schedule, step)
        if should_prune:
            self.prune_to(sparsity, step)
        return should_prune

    def prune_to(self, sparsity, step=None):
        """Keeps `kept_filters(filters, sparsity)` bases (never more than now) and refits."""
        filters = self.layer.filters
        current = self.kept
        n = min(kept_filters(filters, sparsity), len(current))
        fit = fit_assignment(
            np.asarray(self.effective_kernel()),
            n,
            transforms=self.transforms,
            depth_groups=self.depth_groups,
            scale=self.scale,
            criterion=self.criterion,
            candidates=current,
            transform_family=self.transform_family,
        )
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

    def reconstruction_error(self):
        """`||W - W_eff||_F / ||W||_F` over the wrapped kernel, replaced filters' own weights included."""
        w = np.asarray(self.layer.kernel, np.float64)
        eff = np.asarray(self.effective_kernel(), np.float64)
        norm = np.linalg.norm(w)
        return float(np.linalg.norm(w - eff) / norm) if norm else 0.0

    def to_transform_conv(self):
        """The compact `TransformConv2D` computing what this wrapper computes."""
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
        config.update(
            {
                "schedule": serialize_schedule(self.schedule),
                "transforms": list(self.transforms),
                "criterion": self.criterion,
                "depth_groups": self.depth_groups,
                "scale": self.scale,
                "transform_family": self.transform_family,
            }
        )
        return config


# ----------------------------------------------------------------------------
# Callbacks


def _wrappers(model):
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, TransformPruning):
            found.append(layer)
    return found


def update_pruning_step(model, step):
    """Advances every wrapper of `model` to `step` (for custom training loops).

    Returns:
        The names of the wrappers that pruned at this step.
    """
    pruned = []
    for wrapper in _wrappers(model):
        wrapper.step_callback_attached = True
        if wrapper.update(step):
            pruned.append(wrapper.name)
    return pruned


class UpdateTransformPruningStep(keras.callbacks.Callback):
    """Advances the pruning step before each training batch, like tfmot's `UpdatePruningStep`.

    The step continues from the wrappers' saved `pruning_step`, so a resumed
    run picks up where it stopped.
    """

    def on_train_begin(self, logs=None):
        self._wrappers = _wrappers(self.model)
        if not self._wrappers:
            raise ValueError(
                "UpdateTransformPruningStep found no TransformPruning layer in "
                "the model; wrap it with tf_transform_conv.prune_model first."
            )
        for wrapper in self._wrappers:
            wrapper.step_callback_attached = True
        self.step = max(int(np.asarray(w.pruning_step)) for w in self._wrappers)

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        for wrapper in self._wrappers:
            wrapper.update(self.step)

    def on_train_end(self, logs=None):
        for wrapper in self._wrappers:
            wrapper.step_callback_attached = False
        # A later fit without this callback must retrace (and so fail loudly).
        self.model.train_function = None


class TransformPruningSummaries(keras.callbacks.Callback):
    """Writes each wrapper's sparsity and reconstruction error to TensorBoard.

    Args:
        log_dir: the TensorBoard log directory.
        update_freq: `"epoch"` (default) or a number of batches.
    """

    def __init__(self, log_dir, update_freq="epoch"):
        super().__init__()
        if update_freq != "epoch" and not (
            isinstance(update_freq, int) and update_freq > 0
        ):
            raise ValueError(
                "Expected update_freq='epoch' or a positive number of batches. "
                f"Received update_freq={update_freq!r}."
            )
        self.log_dir = log_dir
        self.update_freq = update_freq
        self._writer = None

    def _write(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            for wrapper in _wrappers(self.model):
                step = int(np.asarray(wrapper.pruning_step))
                tf.summary.scalar(f"{wrapper.name}/sparsity", wrapper.sparsity, step=step)
                tf.summary.scalar(
                    f"{wrapper.name}/reconstruction_error",
                    wrapper.reconstruction_error(),
                    step=step,
                )
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and (batch + 1) % self.update_freq == 0:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        if self.update_freq == "epoch":
            self._write()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ----------------------------------------------------------------------------
# Model verbs




def prune_model(
    model,
    schedule,
    transforms="d4",
    criterion="reconstruction",
    depth_groups=1,
    scale=True,
    layers=None,
    transform_family="discrete",
):
    """Wraps chosen `Conv2D` layers of a Sequential or Functional model in `TransformPruning`.

    Args:
        model: a built Sequential or Functional Keras model.
        schedule: the pruning schedule (tfmot `PolynomialDecay`,
            `ConstantSparsity`, or any `schedule(step) -> (should_prune,
            sparsity)`).
        transforms, criterion, depth_groups, scale, transform_family: as
            `TransformPruning`.
        layers: which layers: None (every `Conv2D` with `groups=1` and a
            kernel larger than 1x1), a list of names, a layer class, or a
            predicate `layer -> bool`.

    Returns:
        A new model with the same weights; train it with
        `UpdateTransformPruningStep` among the callbacks.

    Raises:
        ValueError: for a subclassed model or a layer name that matches no
            eligible layer.
    """
    check_graph_model(model, "prune_model")
    chosen = select_layers(model, layers, lambda l: not skip_reason(l, transforms))

    def replace(layer):
        if layer.name not in chosen:
            return None
        inner = layer.__class__.from_config(layer.get_config())
        channels = layer.kernel.shape[2]
        inner.build(
            (None, None, None, channels)
            if layer.data_format == "channels_last"
            else (None, channels, None, None)
        )
        inner.set_weights(layer.get_weights())
        wrapper = TransformPruning(
            inner, schedule, transforms=transforms, criterion=criterion,
            depth_groups=depth_groups, scale=scale, transform_family=transform_family,
        )
        return wrapper, None

    return rewrite_model(model, replace)


def strip_model(model):
    """Replaces every `TransformPruning` wrapper by its compact `TransformConv2D`.

    Returns:
        A new model whose outputs equal the wrapped model's.
    """
    check_graph_model(model, "strip_model")

    def replace(layer):
        if isinstance(layer, TransformPruning):
            return layer.to_transform_conv()
        return None

    return rewrite_model(model, replace)
