"""Inner knowledge distillation on `keras.distillation`: a student learns the teacher's features.

Aflalo et al., "Knapsack Pruning with Inner Distillation" (2020): a pruned
network recovers faster when, besides the task, it matches the features of
the unpruned one at chosen inner layers,

    loss = (1 - w) * task + w * T^2 * KL(softmax(t / T) || softmax(s / T))
           + gamma * mean over the chosen layers l of mean((P_l(s_l) - t_l)^2),

where `s_l` and `t_l` are the student's and the (frozen) teacher's outputs
of layer `l`, and `P_l` is a learned 1x1 projection from the student's
width to the teacher's where the widths differ (after filter removal), the
identity where they agree (a `TransformConv2D` model keeps every width).
With `w = 0` it is the task plus the inner term; with no inner layers, the
usual output distillation (Hinton et al., 2015).

`InnerDistiller` is a `keras.distillation.Distiller` whose terms are
Keras's `LogitsDistillation` (with `keras.losses.KLDivergence`) and
`FeatureDistillation` (through the projection).
"""

import keras
from keras import ops

from tf_transform_conv import _compat
from tf_transform_conv._checks import is_number
from tf_transform_conv.graph.nodes import is_graph_model

__all__ = ["InnerDistiller", "last_feature_map"]


def _check_weight(value, name, high=None):
    if not is_number(value) or value < 0 or (high is not None and value > high):
        expected = f"a number in [0, {high}]" if high is not None else "a number >= 0"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {expected}. "
            f"Received {name}={value!r}."
        )
    return float(value)


def _layer_output(model, name, which):
    try:
        return model.get_layer(name).output
    except ValueError:
        raise ValueError(
            f"Invalid value for argument `layers`: the {which} '{model.name}' has no "
            f"layer named {name!r}."
        ) from None


def last_feature_map(model):
    """The name of the last layer of `model` with a 4D output: its features before pooling.

    The default layer for inner distillation of a convolutional classifier
    (`InnerDistiller(student, teacher, [last_feature_map(student)])`).

    Args:
        model: a built Functional or Sequential `keras.Model`.

    Returns:
        The layer's name.

    Raises:
        ValueError: if no layer of `model` has a 4D output.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="c"),
    ...                           keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    >>> last_feature_map(model)
    'c'
    """
    for layer in reversed(model.layers):
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(
        f"Model '{model.name}' has no layer with a 4D output (a feature map) to distil; "
        "name the layers to distil instead."
    )


class _ProjectedFeatureDistillation(keras.distillation.FeatureDistillation):
    """`FeatureDistillation` of `projection(student features)` against the teacher's.

    The loss is `keras.losses.MeanSquaredError()`, an instance rather than
    the default string `"mse"` (a plain function): it computes in float32
    whatever the features' dtype, and scales for distribution as the
    compiled loss does. `projection` (a layer, or None for the identity)
    belongs to the distiller, which tracks and trains it.
    """

    def __init__(self, teacher_layer_name, student_layer_name, projection=None):
        super().__init__(loss=keras.losses.MeanSquaredError(),
                         teacher_layer_name=teacher_layer_name,
                         student_layer_name=student_layer_name)
        self.projection = projection

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self.projection is not None:
            student_outputs = self.projection(student_outputs)
        return super().compute_loss(teacher_outputs, student_outputs, **kwargs)


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class InnerDistiller(keras.distillation.Distiller):
    """Trains `student` on its task plus the teacher's outputs and inner features.

    Calling the distiller calls the student (its logits); `fit` minimises

        (1 - output_weight) * task_loss
        + output_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + weight * mean_l mean((P_l(s_l) - t_l)^2),

    plus the student's regularization losses (unweighted), with the task
    loss the compiled one, `s_l` / `t_l` the outputs of the chosen layers
    of the student / teacher, and `P_l` a learned 1x1 convolution (a
    `Dense` for 2D features) where their channels differ, else nothing. The teacher is
    frozen and runs in inference mode. The output term is Keras's
    `keras.distillation.LogitsDistillation` with
    `loss=keras.losses.KLDivergence()` (its default string loss skips the
    softmax and the T^2), computed in float32; each inner term a
    `keras.distillation.FeatureDistillation`. They are in
    `distillation_losses`, their weights (`output_weight`, then
    `weight / len(layers)` per layer) in `distillation_loss_weights`.
    The metrics are `loss`, `kd_loss` (the output term, when
    `output_weight > 0`) and `inner_kd_loss` (the mean over the layers,
    when `layers` is not empty), each unweighted. It runs on every backend,
    with or without `jit_compile`. Save `distiller.student` for the
    trained model.

    Compile it as any model (`compile` is `keras.Model.compile`, not
    `Distiller.compile`): the compiled loss is the task loss, sample weights
    and all (None only with `output_weight=1`). Where this class overrides
    `keras.distillation.Distiller` (Keras 3.15), the method's docstring (or
    comment) says why.

    Args:
        student: a built Functional or Sequential `keras.Model` (logits out).
        teacher: a built Functional or Sequential `keras.Model` taking the
            same inputs; with `output_weight > 0`, with the student's output
            shape (the same classes).
        layers: list of layer names present in both models, or of pairs
            `(student_layer, teacher_layer)`: the features to match. Their
            outputs must have the same shape apart from the channels. May be
            empty when `output_weight > 0`: output distillation alone.
        weight: float >= 0, `gamma`, the inner term's weight. Defaults to 1.
        output_weight: float in [0, 1], `w`, the output distillation
            weight; 0 (default) trains on the task and inner terms.
        temperature: float > 0, `T` of the output distillation. Defaults
            to 4.
        **kwargs: `keras.Model` arguments (`name`).

    Raises:
        ValueError: for an unknown layer name, features whose spatial
            shapes differ, subclassed models, a teacher whose output shape
            differs from the student's with `output_weight > 0`, or invalid
            weights.

    Example:

    >>> import keras, numpy as np
    >>> def net(width):
    ...     inputs = keras.Input((8, 8, 3))
    ...     x = keras.layers.Conv2D(width, 3, name="features")(inputs)
    ...     x = keras.layers.GlobalAveragePooling2D()(x)
    ...     return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    >>> distiller = InnerDistiller(net(4), net(8), layers=["features"], weight=0.5)
    >>> distiller.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> history = distiller.fit(np.zeros((4, 8, 8, 3)), np.zeros(4), verbose=0)
    >>> sorted(history.history)
    ['inner_kd_loss', 'loss']
    """

    def __init__(self, student, teacher, layers, weight=1.0, output_weight=0.0,
                 temperature=4.0, **kwargs):
        for model, name in ((student, "student"), (teacher, "teacher")):
            if not isinstance(model, keras.Model) or not is_graph_model(model):
                raise ValueError(
                    f"Invalid value for argument `{name}`. Expected a built Functional or "
                    f"Sequential keras.Model. Received {type(model).__name__}."
                )
        shared = {id(v) for v in student.weights} & {id(v) for v in teacher.weights}
        if student is teacher or shared:
            what = ("is the student itself" if student is teacher
                    else f"shares {len(shared)} weights with the student")
            raise ValueError(
                f"Invalid value for argument `teacher`: it {what}. The distiller "
                "freezes the teacher, so the student would not train. Distil from "
                "another model (a copy: keras.models.clone_model(model) with "
                "set_weights(model.get_weights()))."
            )
        weight = _check_weight(weight, "weight")
        output_weight = _check_weight(output_weight, "output_weight", high=1)
        if not is_number(temperature) or temperature <= 0:
            raise ValueError(
                "Invalid value for argument `temperature`. Expected a number > 0. "
                f"Received temperature={temperature!r}."
            )
        if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or (
                not layers and not output_weight):
            raise ValueError(
                "Invalid value for argument `layers`. Expected a non-empty list of layer "
                "names or (student, teacher) name pairs (an empty one only with "
                f"output_weight > 0). Received layers={layers!r}."
            )
        pairs = [(item, item) if isinstance(item, str) else tuple(item) for item in layers]
        student_out = keras.tree.flatten(student.outputs)[0]
        teacher_out = keras.tree.flatten(teacher.outputs)[0]
        if output_weight and tuple(student_out.shape[1:]) != tuple(teacher_out.shape[1:]):
            raise ValueError(
                f"Invalid value for argument `output_weight`: output distillation compares "
                f"the outputs of both models, but the student '{student.name}' outputs "
                f"{tuple(student_out.shape)} and the teacher '{teacher.name}' "
                f"{tuple(teacher_out.shape)} (other classes?). Pass output_weight=0 to "
                f"distil inner layers only. Received output_weight={output_weight}."
            )
        projections = []
        for s_name, t_name in pairs:
            s_shape = tuple(_layer_output(student, s_name, "student").shape)
            t_shape = tuple(_layer_output(teacher, t_name, "teacher").shape)
            if len(s_shape) != len(t_shape) or s_shape[1:-1] != t_shape[1:-1]:
                raise ValueError(
                    f"The features of student layer '{s_name}' {s_shape} and teacher "
                    f"layer '{t_name}' {t_shape} must have the same shape apart from the "
                    "channels (the last axis)."
                )
            projection = None
            if s_shape[-1] != t_shape[-1]:
                kind = keras.layers.Conv2D if len(s_shape) == 4 else keras.layers.Dense
                options = {"kernel_size": 1} if len(s_shape) == 4 else {}
                projection = kind(t_shape[-1], use_bias=False, name=f"project_{s_name}",
                                  **options)
                projection.build(s_shape)
            projections.append(projection)

        losses, weights = [], []
        if output_weight:
            losses.append(keras.distillation.LogitsDistillation(
                temperature=float(temperature), loss=keras.losses.KLDivergence()))
            weights.append(output_weight)
        for (s_name, t_name), projection in zip(pairs, projections):
            losses.append(_ProjectedFeatureDistillation(t_name, s_name, projection))
            weights.append(weight / len(pairs))
        super().__init__(teacher=teacher, student=student, distillation_losses=losses,
                         distillation_loss_weights=weights,
                         student_loss_weight=1.0 - output_weight,
                         name=kwargs.pop("name", None), **kwargs)
        self.layer_pairs = pairs
        self.weight = weight
        self.output_weight = output_weight
        self.temperature = float(temperature)
        self.projections = projections
        self.inner_tracker = keras.metrics.Mean(name="inner_kd_loss") if pairs else None
        self.kd_tracker = keras.metrics.Mean(name="kd_loss") if output_weight else None
        self._stash = {}

    def _validate_models(self, teacher, student):
        """Checks the inputs only: the outputs are checked in `__init__`.

        Keras's check also requires the same output shapes and dtypes. The
        first is needed only for output distillation (inner distillation
        from a teacher of other classes is fine); the second rejects a
        mixed-precision student of a float32 teacher (measured: "Teacher
        and student output dtypes must match. Teacher: float32, Student:
        bfloat16."), whose logits this class casts to float32.
        """
        self._validate_input_compatibility(teacher, student)

    # Keras's own `Model.compile`, not `Distiller.compile`: that one keeps the loss
    # from `Model.compile` and calls it itself, without the sample weights
    # (measured: a batch whose sample weights are all 0 but one gives the same loss
    # as without them). Compiled here, the task loss weighs samples, and scales
    # under a distribution strategy, as in any model; and a saved distiller
    # compiles when loaded.
    compile = keras.Model.compile

    def call(self, inputs, training=None):
        """The student's logits; its chosen features are kept for `compute_loss`.

        One pass of the student gives both: Keras's `Distiller` runs the
        student a second time (its feature extractor) for the features
        (measured: 2 batch-norm updates per step instead of 1, on
        TensorFlow and JAX).
        """
        extractor = self._student_feature_extractor
        if extractor is None:
            return self.student(inputs, training=training)
        outputs = extractor(inputs, training=training)
        logits = outputs["final_output"]
        # compute_loss, traced in the same step right after, reads them.
        self._stash["logits"] = logits
        self._stash["features"] = outputs
        return logits

    def _student_features(self, x, y_pred, training):
        """The features `call` kept for `y_pred`, or a new pass of the student."""
        if self._student_feature_extractor is None:
            return {}
        logits = self._stash.pop("logits", None)
        features = self._stash.pop("features", None)
        if logits is not None and logits is y_pred:
            return features
        return self._student_feature_extractor(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The distillation loss of the class docstring.

        Overrides Keras's `Distiller.compute_loss`, which (measured on
        Keras 3.15.1): leaves out the student's regularization losses
        (`self.losses`, counted here in full whatever the weights); runs
        the student again for the features; and weighs
        `s * task + (1 - s) * sum_i w_i d_i`, where `s = 1` turns the
        distillation terms off, so "task + gamma * inner" cannot be
        expressed.
        """
        if y_pred is None:
            y_pred = self(x, training=training)
        student = self._student_features(x, y_pred, training)
        loss = 0.0
        if self.output_weight < 1.0:  # the compiled loss plus the regularization losses
            loss = (1.0 - self.output_weight) * keras.Model.compute_loss(
                self, x, y, y_pred, sample_weight, training)
        if self.output_weight > 0.0:  # the regularization losses count in full
            for extra in self.losses:
                loss = loss + self.output_weight * self._aggregate_additional_loss(extra)
        teacher = self._extract_all_teacher_features(x)
        inner = []
        for term, weight in zip(self.distillation_losses, self.distillation_loss_weights):
            if isinstance(term, keras.distillation.LogitsDistillation):
                t = ops.cast(ops.stop_gradient(teacher["final_output"]), "float32")
                s = ops.cast(y_pred, "float32")
            else:
                t = ops.stop_gradient(teacher[term.teacher_layer_name])
                s = student[term.student_layer_name]
            term.validate_outputs(t, s)
            value = term.compute_loss(t, s)
            if isinstance(term, keras.distillation.LogitsDistillation):
                self.kd_tracker.update_state(_compat.unscale_loss_for_distribution(value))
            else:
                inner.append(value)
            loss = loss + weight * value
        if inner:
            self.inner_tracker.update_state(
                _compat.unscale_loss_for_distribution(ops.mean(ops.stack(inner))))
        return loss

    def inner_loss(self, student_features, teacher_features):
        """`mean_l mean((P_l(s_l) - t_l)^2)`, in float32.

        Args:
            student_features: the outputs of the student's chosen layers, in
                the order of `layers`.
            teacher_features: the teacher's, in the same order.

        Returns:
            A float32 scalar tensor.
        """
        terms = [term for term in self.distillation_losses
                 if isinstance(term, _ProjectedFeatureDistillation)]
        values = [term.compute_loss(t, s)
                  for term, s, t in zip(terms, student_features, teacher_features)]
        return ops.mean(ops.stack(values))

    @property
    def metrics(self):
        """`loss`, the compiled metrics, `kd_loss` and `inner_kd_loss`.

        Without Keras's `student_loss`, `distillation_loss` and `total_loss`,
        which follow its own weighting and are not updated here.
        """
        hidden = {id(self.student_loss_tracker), id(self.distillation_loss_tracker),
                  id(self.total_loss_tracker)}
        return [m for m in super().metrics if id(m) not in hidden]

    def get_config(self):
        config = keras.Model.get_config(self)
        config.update({
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "layers": [list(pair) for pair in self.layer_pairs],
            "weight": self.weight,
            "output_weight": self.output_weight,
            "temperature": self.temperature,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        return cls(**config)
