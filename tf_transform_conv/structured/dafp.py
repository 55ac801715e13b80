"""Dependency-aware filter importance and its self-tuning sparsity regulariser.

Zhao et al., "Dependency Aware Filter Pruning" (2020): a channel matters
when both the batch norm that scales it and the next convolution that reads
it give it weight,

    I_i = |gamma_i| * mean_{o, kh, kw} |W_next[kh, kw, i, o]|,

and a layer's channels below a fraction of the layer's largest importance
are pruned. Training drives unimportant channels there with an L1 penalty
`lambda * sum |gamma|` on the batch-norm scales whose `lambda` tunes itself:
it starts at 0 and, once per epoch (or every `frequency` steps), grows by a
step while the channel sparsity is below the target and rising slower than
the remaining updates need, and shrinks by a step while the sparsity is
above the target and still rising (never below 0). At the end a bisection
finds the fraction of each layer's maximum that prunes exactly the target
share of channels.

The importance itself, for coupled channels too, is
`saliency.dafp_importance` (its docstring has the formula).

The penalty is a registered Keras regulariser, `GammaL1`, whose strength is
a `keras.Variable`: `SparsityTuner` attaches it to the scales of the batch
norms of the prunable groups (`variable.regularizer`, which Keras adds to
the model's losses), and assigns the variable between epochs. A compiled
TensorFlow step (with or without `jit_compile`) reads the variable when it
runs, so no retracing is needed; on other backends, where a step captures
the value when it is traced, the callback rebuilds the train function after
each change.
"""

import keras
import numpy as np

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv._checks import is_number
from tf_transform_conv.graph.groups import analyze_groups
from tf_transform_conv.saliency import dafp_importance
from tf_transform_conv.saliency import group_dafp_importance

__all__ = [
    "GammaL1",
    "SparsityTuner",
    "dafp_keep",
    "dafp_sparsity",
    "dafp_threshold",
]


def _check_fraction(fraction, name="fraction"):
    if not is_number(fraction) or not 0 <= fraction < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a number in [0, 1): "
            f"a fraction of each group's largest importance. Received {name}={fraction!r}."
        )
    return float(fraction)


def _pruned(scores, fraction):
    """Which channels fall at or below `fraction` of the group's maximum (never the maximum)."""
    top = scores.max()
    pruned = scores <= fraction * top
    if pruned.all():  # a group of zeros: keep its first channel
        pruned[np.argmax(scores)] = False
    return pruned


def dafp_sparsity(importance, fraction):
    """The share of channels that `fraction` prunes, over every group.

    Args:
        importance: dict of group name -> importance array, as from
            `dafp_importance`.
        fraction: float in [0, 1), the threshold as a fraction of each
            group's largest importance: channels at or below it are pruned
            (a group always keeps its most important channel).

    Returns:
        float in [0, 1].

    Raises:
        ValueError: for a `fraction` outside [0, 1).

    Example:

    >>> import numpy as np
    >>> dafp_sparsity({"a": np.array([1.0, 0.1, 0.5]), "b": np.array([2.0, 0.1])}, 0.2)
    0.4
    """
    fraction = _check_fraction(fraction)
    total = sum(len(v) for v in importance.values())
    if not total:
        return 0.0
    return sum(int(_pruned(np.asarray(v), fraction).sum()) for v in importance.values()) / total


def dafp_threshold(importance, target, iterations=60):
    """The smallest fraction of each group's maximum that prunes at least `target` of the channels.

    Bisection on the fraction: the share pruned grows with it, in steps of
    one channel (two groups crossing at the same fraction aside), so the
    result prunes `ceil(target * channels)` channels, the fewest that reach
    the target, whenever a group can give them up.

    Args:
        importance: dict of group name -> importance array
            (`dafp_importance`), or a built model to compute it from.
        target: float in [0, 1), the share of channels to prune.
        iterations: int, bisection steps (60 reaches float64 resolution).

    Returns:
        float, the fraction, to pass to `dafp_keep`.

    Raises:
        ValueError: for a `target` outside [0, 1), or one that needs more
            channels than the groups can give (each keeps one).

    Example:

    >>> import numpy as np
    >>> importance = {"a": np.array([1.0, 0.1, 0.5, 0.7])}
    >>> fraction = dafp_threshold(importance, 0.5)
    >>> dafp_sparsity(importance, fraction)
    0.5
    """
    if isinstance(importance, keras.Model):
        importance = dafp_importance(importance)
    target = _check_fraction(target, "target")
    check_positive_int(iterations, "iterations")
    high = np.nextafter(1.0, 0.0)
    if dafp_sparsity(importance, high) < target:
        raise ValueError(
            f"Invalid value for argument `target`: target={target} needs more channels "
            f"than the groups can give (each keeps its most important channel): at most "
            f"{dafp_sparsity(importance, high):.4f}."
        )
    low = 0.0
    if dafp_sparsity(importance, low) >= target:
        return low
    for _ in range(iterations):
        middle = (low + high) / 2
        if dafp_sparsity(importance, middle) >= target:
            high = middle
        else:
            low = middle
    return float(high)


def dafp_keep(model, fraction, importance=None):
    """The channels that DAFP keeps: a `keep` argument for `remove_filters`.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        fraction: float in [0, 1): each prunable group keeps the channels
            whose importance exceeds `fraction` times the group's largest
            (and always its most important one).
        importance: optional dict from `dafp_importance(model)`, to save
            computing it again.

    Returns:
        dict mapping group names to sorted kept channel indices (groups that
        keep every channel are left out).

    Raises:
        ValueError: for a `fraction` outside [0, 1), and as
            `dafp_importance`.

    Example:

    >>> import keras
    >>> from tf_transform_conv.structured import remove_filters
    >>> inputs = keras.Input((6, 6, 2))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> model = keras.Model(inputs, keras.layers.Conv2D(3, 3, name="next")(x))
    >>> _ = model.get_layer("bn").gamma.assign([1.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    >>> keep = dafp_keep(model, 0.0)  # the channels of zero scale go
    >>> keep["conv"].tolist(), remove_filters(model, keep).get_layer("conv").filters
    ([0, 2], 2)
    """
    fraction = _check_fraction(fraction)
    if importance is None:
        importance = dafp_importance(model)
    keep = {}
    for name, scores in importance.items():
        pruned = _pruned(np.asarray(scores), fraction)
        if pruned.any():
            keep[name] = np.flatnonzero(~pruned)
    return keep


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class GammaL1(keras.regularizers.Regularizer):
    """An L1 penalty `strength * sum(|x|)` whose strength can change during training.

    The strength is a `keras.Variable`: assign it (`regularizer.strength.assign(v)`)
    between steps, and a compiled step reads the new value without
    retracing (TensorFlow, with or without `jit_compile`).

    Args:
        strength: float >= 0, the initial strength. Defaults to 0.

    Raises:
        ValueError: for a negative or non-numeric `strength`.

    Example:

    >>> import numpy as np
    >>> regularizer = GammaL1(0.5)
    >>> float(regularizer(np.array([1.0, -2.0], "float32")))
    1.5
    """

    def __init__(self, strength=0.0):
        if not is_number(strength) or strength < 0:
            raise ValueError(
                "Invalid value for argument `strength`. Expected a number >= 0. "
                f"Received strength={strength!r}."
            )
        self.strength = keras.Variable(float(strength), trainable=False, dtype="float32",
                                       name="gamma_l1_strength")

    def __call__(self, x):
        return keras.ops.cast(self.strength, x.dtype) * keras.ops.sum(keras.ops.abs(x))

    def get_config(self):
        return {"strength": float(keras.ops.convert_to_numpy(self.strength))}


class SparsityTuner(keras.callbacks.Callback):
    """Trains batch-norm scales sparse with a self-tuning L1 penalty (DAFP).

    At the start of training, attaches a `GammaL1` penalty (strength 0) to
    the scale (`gamma`) of every batch norm of the model's prunable groups
    (`graph.groups.channel_groups`). After every epoch (or every `frequency`
    steps) it measures the channel sparsity, the share of channels whose
    DAFP importance is at or below `threshold` times their group's
    maximum, and updates the strength `lambda`:

    - below `target` and the last gain smaller than
      `(target - sparsity) / updates left`: `lambda += step`;
    - above `target` and still rising: `lambda -= step`;
    - never below 0.

    At the end of training it finds, by bisection (`dafp_threshold`), the
    fraction that prunes exactly the target share (`self.fraction`) and the
    channels to keep (`self.keep`, for `remove_filters`).

    Args:
        target: float in [0, 1), the share of channels to prune.
        step: float > 0, the change of `lambda` per update.
        threshold: float in [0, 1), the fraction of a group's maximum
            importance at or below which a channel counts as pruned while
            training. Defaults to 0.02.
        frequency: `"epoch"` (default) or an int number of training steps
            between updates.

    Attributes:
        regularizer: the `GammaL1` attached to the scales.
        history: list of dicts `{"step", "sparsity", "strength"}`, one per
            update.
        fraction, keep, sparsity: set at the end of training.

    Raises:
        ValueError: for invalid arguments; at the start of training if the
            model has no batch norm in a prunable group.

    Example:

    >>> import keras, numpy as np
    >>> inputs = keras.Input((6, 6, 1))
    >>> x = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> model.compile("adam", "mse")
    >>> tuner = SparsityTuner(target=0.5, step=1e-3)
    >>> _ = model.fit(np.zeros((8, 6, 6, 1)), np.zeros((8, 2)), epochs=2, verbose=0,
    ...               callbacks=[tuner])
    >>> len(tuner.history), len(tuner.keep["conv"])
    (2, 4)
    """

    def __init__(self, target, step, threshold=0.02, frequency="epoch"):
        super().__init__()
        self.target = _check_fraction(target, "target")
        if not is_number(step) or step <= 0:
            raise ValueError(
                "Invalid value for argument `step`. Expected a number > 0. "
                f"Received step={step!r}."
            )
        self.step = float(step)
        self.threshold = _check_fraction(threshold, "threshold")
        if frequency != "epoch":
            check_positive_int(frequency, "frequency", "'epoch' or a strictly positive int")
        self.frequency = frequency
        self.regularizer = GammaL1(0.0)
        self.history = []
        self.fraction = self.keep = self.sparsity = None
        self._analysis = None
        self._last = 0.0
        self._steps = 0

    def on_train_begin(self, logs=None):
        self._analysis = analyze_groups(self.model, "SparsityTuner")
        self._scales = []
        for group in self._analysis.groups:
            if not group.prunable:
                continue
            for path in group.batch_norms:
                layer = self._analysis.call_of(path).layer
                if layer.scale:
                    layer.gamma.regularizer = self.regularizer
                    self._scales.append(layer.gamma)
        if not self._scales:
            raise ValueError(
                "SparsityTuner needs batch norms with a scale in the prunable channel "
                f"groups of model '{self.model.name}'; it has none."
            )
        self._total = self._updates_planned()
        self._done = 0
        self._last = self._measure()
        self._retrace()

    def _updates_planned(self):
        epochs = self.params.get("epochs") or 1
        if self.frequency == "epoch":
            return epochs
        steps = self.params.get("steps") or 0
        return max(1, epochs * steps // self.frequency)

    def _measure(self):
        if keras.backend.backend() == "jax":  # fit keeps the variables outside the model
            self.model.jax_state_sync()
        return dafp_sparsity(group_dafp_importance(self._analysis), self.threshold)

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.frequency != "epoch" and self._steps % self.frequency == 0:
            self._update()

    def on_epoch_end(self, epoch, logs=None):
        if self.frequency == "epoch":
            self._update()

    def _update(self):
        sparsity = self._measure()
        self._done += 1
        strength = float(keras.ops.convert_to_numpy(self.regularizer.strength))
        left = max(1, self._total - self._done + 1)
        if sparsity < self.target:
            if sparsity - self._last < (self.target - sparsity) / left:
                strength += self.step
        elif sparsity > self.target and sparsity > self._last:
            strength -= self.step
        strength = max(strength, 0.0)
        self.regularizer.strength.assign(strength)
        self._last = sparsity
        self.history.append(dict(step=self._steps, sparsity=sparsity, strength=strength))
        self._retrace()

    def _retrace(self):
        # TensorFlow steps read the variable when they run; a JAX step
        # captures its value when traced, so trace again after a change.
        if keras.backend.backend() != "tensorflow":
            self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        importance = group_dafp_importance(self._analysis)
        self.fraction = dafp_threshold(importance, self.target)
        self.sparsity = dafp_sparsity(importance, self.fraction)
        self.keep = dafp_keep(self.model, self.fraction, importance)

    def detach(self):
        """Removes the penalty from the scales it was attached to."""
        for variable in getattr(self, "_scales", []):
            if variable.regularizer is self.regularizer:
                variable.regularizer = None
