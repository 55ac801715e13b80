"""Inner knowledge distillation: a student learns the teacher's inner features.

Aflalo et al., "Knapsack Pruning with Inner Distillation" (2020): a pruned
network recovers faster when, besides the task, it matches the features of
the unpruned one at chosen inner layers,

    loss = task loss + gamma * mean over the chosen layers of
           mean((P(s_l) - t_l)^2),

where `s_l` and `t_l` are the student's and the (frozen) teacher's outputs
of layer `l`, and `P` is a learned 1x1 projection from the student's width
to the teacher's where the widths differ (after filter removal), the
identity where they agree (a `TransformConv2D` model keeps every width).
The usual output distillation can be added:
`(1 - w) * task + w * T^2 * KL(softmax(t/T) || softmax(s/T))`.
"""

import keras
from keras import ops

from tf_transform_conv.graph.nodes import is_graph_model
from tf_transform_conv._checks import is_number

__all__ = ["InnerDistiller"]


def _check_weight(value, name, high=None):
    if not is_number(value) or value < 0 or (high is not None and value > high):
        expected = f"a number in [0, {high}]" if high is not None else "a number >= 0"
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected {expected}. "
            f"Received {name}={value!r}."
        )
    return float(value)


def _inputs(model):
    """The model's input tensor, or its list of them when it has several."""
    inputs = keras.tree.flatten(model.inputs)
    return inputs[0] if len(inputs) == 1 else model.inputs


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class InnerDistiller(keras.Model):
    """Trains `student` on its task plus the teacher's inner features (inner distillation).

    Calling the distiller calls the student (its logits); `fit` minimises

        (1 - output_weight) * task_loss
        + output_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
        + weight * mean_l mean((P_l(s_l) - t_l)^2),

    with the task loss the compiled one, `s_l` / `t_l` the outputs of the
    chosen layers of the student / teacher, and `P_l` a learned 1x1
    convolution (a `Dense` for 2D features) where their channels differ,
    else nothing. The teacher is frozen and runs in inference mode. The
    loss is computed in `compute_loss`, so it runs on every backend and
    with or without `jit_compile`; the inner term is tracked as the metric
    `inner_kd_loss` (and the output term as `kd_loss` when
    `output_weight > 0`). Save `distiller.student` for the trained model.

    Args:
        student: a built Functional or Sequential `keras.Model` (logits out).
        teacher: a built Functional or Sequential `keras.Model` taking the
            same inputs.
        layers: list of layer names present in both models, or of pairs
            `(student_layer, teacher_layer)`: the features to match. Their
            outputs must have the same shape apart from the channels.
        weight: float >= 0, `gamma`, the inner term's weight. Defaults to 1.
        output_weight: float in [0, 1], `w`, the output distillation
            weight; 0 (default) trains on the task loss alone.
        temperature: float > 0, `T` of the output distillation. Defaults
            to 4.
        **kwargs: `keras.Model` arguments (`name`).

    Raises:
        ValueError: for an unknown layer name, features whose spatial
            shapes differ, subclassed models, or invalid weights.

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
        super().__init__(**kwargs)
        for model, name in ((student, "student"), (teacher, "teacher")):
            if not isinstance(model, keras.Model) or not is_graph_model(model):
                raise ValueError(
                    f"Invalid value for argument `{name}`. Expected a built Functional or "
                    f"Sequential keras.Model. Received {type(model).__name__}."
                )
        self.weight = _check_weight(weight, "weight")
        self.output_weight = _check_weight(output_weight, "output_weight", high=1)
        if not is_number(temperature) or temperature <= 0:
            raise ValueError(
                "Invalid value for argument `temperature`. Expected a number > 0. "
                f"Received temperature={temperature!r}."
            )
        self.temperature = float(temperature)
        if isinstance(layers, str) or not layers:
            raise ValueError(
                "Invalid value for argument `layers`. Expected a non-empty list of layer "
                f"names or (student, teacher) name pairs. Received layers={layers!r}."
            )
        self.layer_pairs = [
            (item, item) if isinstance(item, str) else tuple(item) for item in layers
        ]
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        student_out = [self._output(student, s, "student") for s, _ in self.layer_pairs]
        teacher_out = [self._output(teacher, t, "teacher") for _, t in self.layer_pairs]
        self.student_features = keras.Model(
            _inputs(student), [*keras.tree.flatten(student.outputs)[:1], *student_out],
            name=f"{student.name}_features")
        self.teacher_features = keras.Model(
            _inputs(teacher), [*keras.tree.flatten(teacher.outputs)[:1], *teacher_out],
            name=f"{teacher.name}_features")
        self.projections = []
        for (s_name, t_name), s, t in zip(self.layer_pairs, student_out, teacher_out):
            s_shape, t_shape = tuple(s.shape), tuple(t.shape)
            if len(s_shape) != len(t_shape) or s_shape[1:-1] != t_shape[1:-1]:
                raise ValueError(
                    f"The features of student layer '{s_name}' {s_shape} and teacher "
                    f"layer '{t_name}' {t_shape} must have the same shape apart from the "
                    "channels (the last axis)."
                )
            if s_shape[-1] == t_shape[-1]:
                self.projections.append(None)
            elif len(s_shape) == 4:
                self.projections.append(keras.layers.Conv2D(
                    t_shape[-1], 1, use_bias=False, name=f"project_{s_name}"))
            else:
                self.projections.append(keras.layers.Dense(
                    t_shape[-1], use_bias=False, name=f"project_{s_name}"))
        for projection, s in zip(self.projections, student_out):
            if projection is not None:
                projection.build(tuple(s.shape))
        self.inner_tracker = keras.metrics.Mean(name="inner_kd_loss")
        self.kd_tracker = keras.metrics.Mean(name="kd_loss") if self.output_weight else None
        self._stash = {}

    @staticmethod
    def _output(model, name, which):
        try:
            return model.get_layer(name).output
        except ValueError:
            raise ValueError(
                f"Invalid value for argument `layers`: the {which} '{model.name}' has no "
                f"layer named {name!r}."
            ) from None

    def call(self, inputs, training=None):
        outputs = self.student_features(inputs, training=training)
        # compute_loss, traced in the same step right after, reads the features.
        self._stash["features"] = outputs[1:]
        return outputs[0]

    def inner_loss(self, student_features, teacher_features):
        """`mean_l mean((P_l(s_l) - t_l)^2)`, in float32."""
        terms = []
        for projection, s, t in zip(self.projections, student_features, teacher_features):
            if projection is not None:
                s = projection(s)
            difference = ops.cast(s, "float32") - ops.cast(t, "float32")
            terms.append(ops.mean(ops.square(difference)))
        return ops.mean(ops.stack(terms))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        task = super().compute_loss(x, y, y_pred, sample_weight, training)
        features = self._stash.get("features")
        if features is None:  # compute_loss called without call(): run the student
            features = self.student_features(x, training=training)[1:]
        teacher = self.teacher_features(x, training=False)
        teacher = [ops.stop_gradient(t) for t in teacher]
        inner = self.inner_loss(features, teacher[1:])
        self.inner_tracker.update_state(inner)
        loss = task
        if self.output_weight:
            t = self.temperature
            p_teacher = ops.softmax(ops.cast(teacher[0], "float32") / t)
            log_student = ops.log_softmax(ops.cast(y_pred, "float32") / t)
            kl = ops.sum(p_teacher * (ops.log(ops.maximum(p_teacher, 1e-12)) - log_student),
                         axis=-1)
            kd = (t * t) * ops.mean(kl)
            self.kd_tracker.update_state(kd)
            loss = (1.0 - self.output_weight) * task + self.output_weight * kd
        return loss + self.weight * inner

    @property
    def metrics(self):
        extra = [self.inner_tracker] + ([self.kd_tracker] if self.kd_tracker else [])
        return [*super().metrics, *extra]

    def get_config(self):
        config = super().get_config()
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
