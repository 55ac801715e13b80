"""Training as generalised pruning.

`prune_model` wraps chosen `Conv2D` layers in `TransformPruning`. During
training, `UpdateTransformPruningStep` advances a step counter and asks each
wrapper's schedule (tfmot's `PolynomialDecay` / `ConstantSparsity`, or any
callable `schedule(step) -> (should_prune, sparsity)`) whether to prune. At a
pruning step a wrapper keeps `n = filters - floor(s * filters + 1/2)` filters
(at least one) as *bases* and replaces every other filter by
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
import json

import keras
import numpy as np
from keras import ops

from tf_transform_conv import _compat
from tf_transform_conv import families as families_lib
from tf_transform_conv._checks import check_positive_int
from tf_transform_conv import transforms as transforms_lib
from tf_transform_conv.assignment import allocate_globally
from tf_transform_conv.assignment import filter_saliency
from tf_transform_conv.assignment import fit_assignment
from tf_transform_conv.assignment import kept_filters
from tf_transform_conv.convert import transform_conv_from_conv2d
from tf_transform_conv.rewrite import CONVOLUTIONS
from tf_transform_conv.rewrite import check_graph_model
from tf_transform_conv.rewrite import check_options
from tf_transform_conv.rewrite import check_transforms
from tf_transform_conv.rewrite import layer_depth_groups
from tf_transform_conv.rewrite import rewrite_model
from tf_transform_conv.rewrite import select_layers
from tf_transform_conv.rewrite import skip_reason
from tf_transform_conv.recalibrate import batches
from tf_transform_conv.recalibrate import recalibrate_batch_norm

_TFMOT_SCHEDULES = ("PolynomialDecay", "ConstantSparsity")
_TFMOT_SCHEDULE_MODULE = (
    "tensorflow_model_optimization.python.core.sparsity.keras.pruning_schedule"
)


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


_SCHEDULE_CONTRACT = (
    "a callable schedule(step) -> (should_prune, sparsity): tfmot's "
    "PolynomialDecay or ConstantSparsity, a function, or an object with "
    "__call__(self, step), as tfmot's PruningSchedule subclasses have"
)


def check_schedule(schedule):
    """Raises a ValueError unless `schedule` is callable as `schedule(step)`."""
    if callable(schedule):
        return
    hint = ""
    if callable(getattr(schedule, "schedule", None)):
        hint = (
            f" {type(schedule).__name__} has a `schedule` method but no `__call__`: "
            "name the method `__call__` (or add `__call__ = schedule` to the class)."
        )
    raise ValueError(
        f"Invalid value for argument `schedule`. Expected {_SCHEDULE_CONTRACT}. "
        f"Received schedule={schedule!r}.{hint}"
    )


def _evaluate_schedule(schedule, step):
    """`(should_prune: bool, sparsity: float)` from `schedule(step)`, checked."""
    result = schedule(step)
    should_prune = sparsity = None
    if isinstance(result, (tuple, list)) and len(result) == 2:
        should_prune, sparsity = (np.asarray(value) for value in result)
    if (
        should_prune is None
        or should_prune.shape != () or should_prune.dtype != bool
        or sparsity.shape != () or sparsity.dtype.kind not in "fiu"
    ):
        raise ValueError(
            f"The pruning schedule {schedule!r} returned {result!r} at step {step}; "
            "expected a pair (should_prune: bool, sparsity: float in [0, 1)), as "
            "tfmot's schedules return."
        )
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"The pruning schedule returned sparsity={sparsity} at step {step}; "
            "expected a value in [0, 1)."
        )
    return bool(should_prune), sparsity


# ----------------------------------------------------------------------------
# The wrapper


def check_step_callback(wrapper, training):
    """Raises the error that names the missing step callback when `wrapper`
    trains without it (what every pruning wrapper's `call` checks first)."""
    if training and not wrapper.step_callback_attached:
        raise ValueError(
            f"Layer '{wrapper.name}' is being trained without its pruning "
            "step callback. Pass "
            "`callbacks=[tf_transform_conv.UpdateTransformPruningStep()]` to "
            "`model.fit` (or, in a custom loop, call "
            "`update_pruning_step(model, step)` before each batch)."
        )


def _check_wrappable(layer, transforms):
    reason = skip_reason(layer, transforms)
    if reason:
        raise ValueError(
            f"TransformPruning cannot wrap {type(layer).__name__} '{layer.name}': "
            f"{reason}. It wraps keras.layers.Conv2D layers with groups=1 and "
            "a kernel larger than 1x1."
        )


_TAYLOR_NEEDS_DATA = (
    "Layer '{name}' ranks filters by their first-order (Taylor) saliency, which "
    "needs gradients on data: pass UpdateTransformPruningStep(saliency_data=...) "
    "(or scores= to update_pruning_step in a custom loop)."
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
        schedule: a pruning schedule, a callable `schedule(step) ->
            (should_prune: bool, sparsity: float in [0, 1))`: tfmot's
            `PolynomialDecay` and `ConstantSparsity` as they are, a function,
            or an object with `__call__(self, step)` (as tfmot's
            `PruningSchedule` subclasses). What it returns is checked at
            each evaluation.
        transforms: preset or names (must contain `"identity"`). Defaults to
            `"d4"`.
        criterion: which filters stay bases: `"reconstruction"` (default:
            the set that rebuilds the rest best), `"l1"` or `"magnitude"`
            (the largest L1 or L2 norms; the paper's saliency is the L2
            norm), or `"taylor"` (the first-order saliency `|sum(w * dL/dw)|`
            of each filter, which `UpdateTransformPruningStep(saliency_data=...)`
            accumulates over a few batches at each pruning step).
        depth_groups: int >= 1, input channel groups with their own
            assignment; it must divide the layer's input channels.
        scale: bool, whether reconstructed filters carry a trainable scale.
        transform_family: `"discrete"` (default) or a learned family
            (`"scalar"`, `"rotation"`, `"affine"`, `"general"`,
            `tf_transform_conv.families`): each reconstructed filter is then
            `scale * L(phi) @ T(base)` with trainable parameters `phi`, which
            start, at the pruning step that replaces the filter, at their
            least-squares fit to it.
        allocation: `"per_layer"` (default): this layer reaches the
            schedule's sparsity itself; `"global"`: one ranking over every
            global wrapper of the model (by the criterion's saliency; the L2
            norm for `"reconstruction"`) reaches the schedule's sparsity
            overall, each layer keeping at least `min_bases` and never more
            than it keeps (`assignment.allocate_globally`).
        min_bases: int >= 1, the fewest bases a layer keeps (the paper: 8 on
            CIFAR, 32 on ImageNet). Defaults to 1.
        assign: `"fit"` (default): each replaced filter takes the kept filter
            that rebuilds it best; `"modulo"`: replaced filter `o` takes kept
            filter `o mod n` (the paper), with its best transform and scale.
        subtract_mean: for global allocation, rank `||W_o|| - mean(||W||)`
            per layer instead of the norm (the paper's v1, which keeps the
            layers' rates uniform). Defaults to False.
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
        allocation="per_layer",
        min_bases=1,
        assign="fit",
        subtract_mean=False,
        **kwargs,
    ):
        kwargs.setdefault("name", f"transform_pruning_{layer.name}")
        super().__init__(layer, **kwargs)
        if isinstance(schedule, dict):
            schedule = deserialize_schedule(schedule)
        check_schedule(schedule)
        check_options(transforms, criterion, depth_groups, scale, transform_family,
                      allocation, min_bases, assign, subtract_mean)
        _check_wrappable(layer, transforms)
        self.schedule = schedule
        self.transforms = check_transforms(transforms, layer.kernel_size)
        self.criterion = criterion
        self.depth_groups = int(depth_groups)
        self.scale = bool(scale)
        self.transform_family = transform_family
        self.allocation = allocation
        self.min_bases = int(min_bases)
        self.assign = assign
        self.subtract_mean = bool(subtract_mean)
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
        check_step_callback(self, training)
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

    def update(self, step, scores=None):
        """Runs the schedule at `step`; prunes when it says so. Returns whether it pruned.

        A global wrapper only records the step: `update_pruning_step` prunes
        all of a model's global wrappers together.
        """
        should_prune, sparsity = _evaluate_schedule(self.schedule, step)
        if should_prune and self.allocation == "per_layer":
            self.prune_to(sparsity, step, scores=scores)
        self.pruning_step.assign(step)  # after pruning: a failed step is not skipped
        return should_prune

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
        return filter_saliency(kernel, self.criterion, scores, self.subtract_mean, self.kept)

    def prune_to(self, sparsity=None, step=None, scores=None, count=None):
        """Keeps `kept_filters(filters, sparsity)` (or `count`) bases, never more than now, and refits."""
        filters = self.layer.filters
        current = self.kept
        wanted = count if count is not None else kept_filters(filters, sparsity)
        n = min(max(wanted, min(self.min_bases, filters)), len(current))
        if self.criterion == "taylor" and scores is None:
            raise ValueError(_TAYLOR_NEEDS_DATA.format(name=self.name))
        fit = fit_assignment(
            np.asarray(self.effective_kernel()),
            n,
            transforms=self.transforms,
            depth_groups=self.depth_groups,
            scale=self.scale,
            criterion=self.criterion,
            candidates=current,
            transform_family=self.transform_family,
            scores=scores if self.criterion == "taylor" else None,
            assign=self.assign,
        )
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

    def reconstruction_error(self):
        """`||W - W_eff||_F / ||W||_F` over the wrapped kernel, replaced filters' own weights included."""
        w = np.asarray(self.layer.kernel, np.float64)
        eff = np.asarray(self.effective_kernel(), np.float64)
        norm = np.linalg.norm(w)
        return float(np.linalg.norm(w - eff) / norm) if norm else 0.0

    def to_transform_conv(self):
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
        config.update(
            {
                "schedule": serialize_schedule(self.schedule),
                "transforms": list(self.transforms),
                "criterion": self.criterion,
                "depth_groups": self.depth_groups,
                "scale": self.scale,
                "transform_family": self.transform_family,
                "allocation": self.allocation,
                "min_bases": self.min_bases,
                "assign": self.assign,
                "subtract_mean": self.subtract_mean,
            }
        )
        return config


# ----------------------------------------------------------------------------
# Callbacks


def _wrappers(model):
    found = []
    for layer in _compat.layers_of(model):
        if isinstance(layer, TransformPruning):
            found.append(layer)
    return found


def _scheduled(model):
    """Every layer of `model` the step callbacks drive.

    `TransformPruning` wrappers, and any layer with `is_scheduled_pruning =
    True` (the wrappers of `tf_transform_conv.unstructured`): such a layer
    has `schedule`, `pruning_step`, `step_callback_attached`, `allocation`
    (`"per_layer"`), `criterion`, `sparsity` and `prune_to(sparsity, step,
    scores)`; its `apply_mask()` runs after every step, and `strip()` gives
    `strip_model` its `(layer, weights)`.
    """
    return [layer for layer in _compat.layers_of(model)
            if isinstance(layer, TransformPruning)
            or getattr(layer, "is_scheduled_pruning", False)]


def update_pruning_step(model, step, scores=None):
    """Advances every wrapper of `model` to `step` (for custom training loops).

    Per-layer wrappers prune themselves when their schedule says so; the
    global ones (`allocation="global"`) prune together, under the schedule
    of the first of them (they must share one), to one ranking over all of
    them (`prune_globally`).

    Args:
        model: a model holding `TransformPruning` wrappers (or the
            unstructured ones, `MagnitudePruning`, `InterspacePruning`).
        step: int, the training step.
        scores: optional dict from wrapper names to per-filter saliencies,
            for wrappers with `criterion="taylor"` (`taylor_scores`).

    Returns:
        The names of the wrappers that pruned at this step.
    """
    return _update(_scheduled(model), step, scores or {})


def _decisions(wrappers, step):
    """`(should_prune, sparsity)` per wrapper at `step`, each schedule evaluated once.

    The global wrappers share the first global wrapper's schedule.
    """
    together = [w for w in wrappers if w.allocation == "global"]
    shared = _evaluate_schedule(together[0].schedule, step) if together else None
    return [shared if w.allocation == "global" else _evaluate_schedule(w.schedule, step)
            for w in wrappers]


def _update(wrappers, step, scores, decisions=None):
    if decisions is None:
        decisions = _decisions(wrappers, step)
    pruned = []
    for wrapper, (should_prune, sparsity) in zip(wrappers, decisions):
        wrapper.step_callback_attached = True
        if should_prune and wrapper.allocation == "per_layer":
            wrapper.prune_to(sparsity, step, scores=scores.get(wrapper.name))
            pruned.append(wrapper.name)
    together = [w for w in wrappers if w.allocation == "global"]
    if together:
        should_prune, sparsity = decisions[wrappers.index(together[0])]
        if should_prune:
            _check_one_schedule(together)
            prune_globally(together, sparsity, step, scores)
            pruned += [w.name for w in together]
    for wrapper in wrappers:  # after pruning: a failed step is not skipped
        if hasattr(wrapper, "apply_mask"):  # pruned weights stay zero
            wrapper.apply_mask()
        wrapper.pruning_step.assign(step)
    return pruned


def _check_one_schedule(wrappers):
    configs = {json.dumps(serialize_schedule(w.schedule), sort_keys=True, default=str)
               if _saveable(w.schedule) else id(w.schedule) for w in wrappers}
    if len(configs) > 1:
        raise ValueError(
            "Wrappers with allocation='global' prune together and need one schedule; "
            f"{[w.name for w in wrappers]} have different ones. Pass the same schedule "
            "to every wrapper (prune_model does)."
        )


def _saveable(schedule):
    try:
        serialize_schedule(schedule)
    except ValueError:
        return False
    return True


def prune_globally(wrappers, sparsity, step=None, scores=None):
    """Prunes `wrappers` together to `sparsity` over all their filters.

    Keeps `kept_filters(total, sparsity)` filters over all the wrappers,
    split by one ranking of their saliencies (`TransformPruning.saliency`)
    with each wrapper keeping at least its `min_bases` and never more than
    it keeps now (`assignment.allocate_globally`); then each wrapper refits
    to its count with its own criterion.

    Returns:
        The kept count per wrapper.
    """
    scores = scores or {}
    total = sum(w.layer.filters for w in wrappers)
    target = kept_filters(total, sparsity)
    saliencies = [w.saliency(scores.get(w.name))[w.kept] for w in wrappers]
    counts = allocate_globally(saliencies, target, [w.min_bases for w in wrappers])
    for wrapper, count in zip(wrappers, counts):
        wrapper.prune_to(step=step, scores=scores.get(wrapper.name), count=count)
    return counts


def taylor_scores(model, data, num_batches=4, batch_size=32):
    """The first-order saliency of every wrapped filter: `|sum(w * dL/dw)|`, averaged over batches.

    For each `TransformPruning` wrapper, the gradient of the model's
    compiled loss (`model.compute_loss`) with respect to the wrapped kernel,
    times the kernel, summed over each filter's entries (Molchanov et al.,
    "Importance Estimation for Neural Network Pruning", CVPR 2019), on
    `num_batches` batches of labelled data, the model in inference mode. A
    kept filter's gradient includes what reaches it through the filters
    rebuilt from it. TensorFlow backend.

    Args:
        model: a compiled model holding wrappers.
        data: `(x, y)` arrays (split into `batch_size` batches), a
            `tf.data.Dataset` or an iterable of `(x, y)` batches.
        num_batches: int >= 1. Defaults to 4.
        batch_size: int, for array data.

    Returns:
        A dict from wrapper names to float arrays `(filters,)`.

    Raises:
        ValueError: on another backend, for an uncompiled model, or data
            without labels.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "taylor_scores() takes gradients with TensorFlow; on the "
            f"{keras.backend.backend()} backend use criterion='magnitude'."
        )
    if getattr(model, "compiled", False) is False and getattr(model, "loss", None) is None:
        raise ValueError(
            "taylor_scores() differentiates the model's compiled loss: compile the "
            "model first."
        )
    wrappers = _wrappers(model)
    totals = kernel_taylor_scores(
        model, data, [w.layer.kernel for w in wrappers], num_batches, batch_size,
        verb="taylor_scores",
    )
    return {w.name: total for w, total in zip(wrappers, totals)}


def kernel_taylor_scores(model, data, kernels, num_batches=4, batch_size=32,
                         per_weight=False, verb="kernel_taylor_scores"):
    """First-order saliencies of the output channels (last axis) of `kernels`, batch-averaged.

    The gradient of the model's compiled loss with respect to each kernel,
    in inference mode, times the kernel, reduced over every axis but the
    last: `|sum(w * dL/dw)|` per channel (`taylor_scores`), or with
    `per_weight` `sum |w * dL/dw|` (the knapsack pruning importance,
    `knapsack.filter_importance`), averaged over `num_batches` batches of
    labelled data. TensorFlow backend; the model must be compiled.

    Returns:
        A list of float64 arrays `(kernel.shape[-1],)`, one per kernel.
    """
    import tensorflow as tf

    totals = [np.zeros(kernel.shape[-1]) for kernel in kernels]
    seen = 0
    for x, y in batches(data, num_batches, batch_size, labelled=True):
        with tf.GradientTape() as tape:
            prediction = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=prediction, training=False)
        for total, kernel, grad in zip(totals, kernels, tape.gradient(loss, kernels)):
            product = np.asarray(kernel, "float64") * np.asarray(grad, "float64")
            axes = tuple(range(product.ndim - 1))
            total += np.abs(product).sum(axis=axes) if per_weight else np.abs(
                product.sum(axis=axes))
        seen += 1
    if not seen:
        raise ValueError(f"{verb}: `data` yielded no batch.")
    return [total / seen for total in totals]


class UpdateTransformPruningStep(keras.callbacks.Callback):
    """Advances the pruning step before each training batch, like tfmot's `UpdatePruningStep`.

    The step continues from the wrappers' saved `pruning_step`, so a resumed
    run picks up where it stopped.

    Args:
        saliency_data: labelled data (`(x, y)` arrays, a dataset, or batches)
            for wrappers with `criterion="taylor"`: at each pruning step their
            saliencies are accumulated over `saliency_batches` batches of it
            (`taylor_scores`). Required when a wrapper needs it.
        saliency_batches: int, defaults to 4.
        recalibrate_data: optional training inputs: after each pruning step
            the batch-norm statistics are re-estimated from
            `recalibrate_batches` batches of them
            (`recalibrate.recalibrate_batch_norm`).
        recalibrate_batches: int, defaults to 20.
    """

    def __init__(self, saliency_data=None, saliency_batches=4, recalibrate_data=None,
                 recalibrate_batches=20):
        super().__init__()
        self.saliency_data = saliency_data
        self.saliency_batches = check_positive_int(
            saliency_batches, "saliency_batches", expected="a positive int"
        )
        self.recalibrate_data = recalibrate_data
        self.recalibrate_batches = check_positive_int(
            recalibrate_batches, "recalibrate_batches", expected="a positive int"
        )

    def on_train_begin(self, logs=None):
        self._wrappers = _scheduled(self.model)
        if not self._wrappers:
            raise ValueError(
                "UpdateTransformPruningStep found no TransformPruning layer in "
                "the model; wrap it with tf_transform_conv.prune_model first "
                "(or prune_low_magnitude / prune_interspace)."
            )
        taylor = [w.name for w in self._wrappers if w.criterion == "taylor"]
        if taylor and self.saliency_data is None:
            raise ValueError(
                f"Wrappers {taylor} rank filters by their Taylor saliency: pass "
                "UpdateTransformPruningStep(saliency_data=(x, y)) (a few batches of "
                "training data)."
            )
        for wrapper in self._wrappers:
            wrapper.step_callback_attached = True
        self.step = max(int(np.asarray(w.pruning_step)) for w in self._wrappers)

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        decisions = _decisions(self._wrappers, self.step)
        due = [w for w, (should_prune, _) in zip(self._wrappers, decisions) if should_prune]
        if keras.backend.backend() == "jax":
            # JAX's fit keeps the variables outside the model between syncs
            # (the model's own are emptied): hand them back only to prune, or
            # to record the step at the last batch of an epoch.
            last = batch + 1 == (self.params or {}).get("steps")
            if not (due or last):
                return
            self.model.jax_state_sync()
        scores = {}
        if any(w.criterion == "taylor" for w in due):
            scores = taylor_scores(self.model, self.saliency_data, self.saliency_batches)
        pruned = _update(self._wrappers, self.step, scores, decisions)
        if pruned and self.recalibrate_data is not None:
            recalibrate_batch_norm(self.model, self.recalibrate_data, self.recalibrate_batches)

    def on_epoch_end(self, epoch, logs=None):
        if keras.backend.backend() == "jax":  # the variables are synced here
            for wrapper in self._wrappers:
                wrapper.pruning_step.assign(self.step)

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
            for wrapper in _scheduled(self.model):
                step = int(np.asarray(wrapper.pruning_step))
                tf.summary.scalar(f"{wrapper.name}/sparsity", wrapper.sparsity, step=step)
                if not isinstance(wrapper, TransformPruning):
                    continue
                tf.summary.scalar(
                    f"{wrapper.name}/reconstruction_error",
                    wrapper.reconstruction_error(),
                    step=step,
                )
        self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch" and (batch + 1) % self.update_freq == 0:
            if keras.backend.backend() == "jax":  # the variables are outside the model
                self.model.jax_state_sync()
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
    allocation="per_layer",
    min_bases=1,
    assign="fit",
    subtract_mean=False,
    budget=None,
):
    """Wraps chosen `Conv2D` layers of a Sequential or Functional model in `TransformPruning`.

    Args:
        model: a built Sequential or Functional Keras model (not a path:
            load it with `keras.saving.load_model` first).
        schedule: the pruning schedule, a callable `schedule(step) ->
            (should_prune, sparsity)`: tfmot `PolynomialDecay`,
            `ConstantSparsity`, a function or an object with `__call__`.
        transforms, criterion, depth_groups, scale, transform_family,
        allocation, min_bases, assign, subtract_mean: as `TransformPruning`
            (every wrapper gets the same values, except `depth_groups`,
            which is 1 for a layer whose input channels it does not divide,
            as `conv_factory` does; with `allocation="global"` the wrapped
            layers are pruned together, to one ranking).
        layers: which layers: None (every `Conv2D` with `groups=1` and a
            kernel larger than 1x1), a list of names, a layer class, or a
            predicate `layer -> bool`.
        budget: optional `budget.Budget` (planned here on the model's
            current weights, without data) or `budget.BudgetPlan` (from
            `budget.plan_budget`): only the layers the plan converts are
            wrapped, each with `schedule` scaled to end at its own sparsity
            (`budget.ScaledSchedule`; the schedule then gives the timing and
            must state its final sparsity, as tfmot's schedules do). Only
            with `allocation="per_layer"`.

    Returns:
        A new model with the same weights; train it with
        `UpdateTransformPruningStep` among the callbacks.

    Raises:
        ValueError: before anything is wrapped, for any invalid argument
            (the message names it and what is allowed), something other than
            a built Sequential or Functional model, or a layer name that
            matches no eligible layer; and when no layer gets wrapped (the
            message lists the model's convolutions and why each was left).
    """
    check_graph_model(model, "prune_model")
    check_schedule(schedule)
    check_options(transforms, criterion, depth_groups, scale, transform_family,
                  allocation, min_bases, assign, subtract_mean)
    layer_schedule = {}
    if budget is not None:
        from tf_transform_conv import budget as budget_lib

        if allocation != "per_layer":
            raise ValueError(
                "`budget` chooses each layer's bases itself: use allocation='per_layer'. "
                f"Received allocation={allocation!r}."
            )
        final = budget_lib.final_sparsity(schedule)
        if not final:
            raise ValueError(
                "With `budget`, the schedule gives the timing and each layer's sparsity "
                "comes from the plan: the schedule must state a final sparsity > 0 "
                "(tfmot PolynomialDecay / ConstantSparsity, or a `final_sparsity` "
                f"attribute). Received schedule={schedule!r}."
            )
        plan = budget_lib.resolve_plan(model, budget, transforms, scale, depth_groups, layers)
        for choice in plan.choices:
            if choice.bases is not None:
                sparsity = (choice.filters - choice.bases) / choice.filters
                layer_schedule[choice.name] = budget_lib.ScaledSchedule(
                    schedule, sparsity / final)
        layers = sorted(layer_schedule) or (lambda layer: False)
    chosen = select_layers(model, layers, lambda l: not skip_reason(l, transforms))
    wrapped = []

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
            inner, layer_schedule.get(layer.name, schedule), transforms=transforms,
            criterion=criterion,
            depth_groups=layer_depth_groups(layer, depth_groups), scale=scale,
            transform_family=transform_family, allocation=allocation, min_bases=min_bases, assign=assign,
            subtract_mean=subtract_mean,
        )
        wrapped.append(layer.name)
        return wrapper, None

    new_model = rewrite_model(model, replace)
    if not wrapped:
        inside = {id(w.layer) for w in _wrappers(model)}
        left = {
            layer.name: "already wrapped" if id(layer) in inside
            else skip_reason(layer, transforms) or "not chosen by `layers`"
            for layer in _compat.layers_of(model)
            if isinstance(layer, CONVOLUTIONS)
        }
        raise ValueError(
            f"prune_model wrapped no layer of model '{model.name}': it wraps the "
            "keras.layers.Conv2D layers with groups=1 and a kernel larger than 1x1 "
            "that `layers` chooses. "
            + (f"Its convolutions: {left}." if left else "It has no Conv2D layer.")
        )
    return new_model


def _strip_subclassed_advice(model):
    found = [w.name for w in _wrappers(model)]
    return (
        "To strip the wrappers of a subclassed model, in its own code replace each "
        "TransformPruning attribute by its compact layer: `layer, weights = "
        "wrapper.to_transform_conv()`, build the layer (call it on an input, or "
        "layer.build(input_shape)), then `layer.set_weights(weights)`. Wrappers "
        f"here: {found}."
    )


def strip_model(model):
    """Replaces every `TransformPruning` wrapper by its compact `TransformConv2D`.

    The unstructured wrappers are stripped too: a `MagnitudePruning` to its
    plain layer with the masked kernel, an `InterspacePruning` to a
    `FilterBasisConv2D` (`wrapper.strip()`).

    Args:
        model: a built Sequential or Functional model. For a subclassed
            model, replace each wrapper in its own code by the layer of
            `wrapper.to_transform_conv()` (see there).

    Returns:
        A new model whose outputs equal the wrapped model's.
    """
    check_graph_model(model, "strip_model", subclassed_advice=_strip_subclassed_advice)

    def replace(layer):
        if isinstance(layer, TransformPruning):
            return layer.to_transform_conv()
        if getattr(layer, "is_scheduled_pruning", False):
            return layer.strip()
        return None

    return rewrite_model(model, replace)
