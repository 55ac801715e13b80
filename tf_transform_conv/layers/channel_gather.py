"""`ChannelGather`: reorders the channels of a tensor (one GATHER in TFLite)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tf_transform_conv")
class ChannelGather(keras.layers.Layer):
    """Reorders the last axis: `outputs[..., j] = inputs[..., indices[j]]`.

    What `propagate_channel_order` inserts where a tensor in a grouped
    layer's order must return to filter order (a model output, or the input
    of a layer the pass does not know). TFLite: one GATHER.

    Args:
        indices: sequence of ints, a permutation of `range(channels)`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(self, indices, **kwargs):
        super().__init__(**kwargs)
        indices = [int(i) for i in indices]
        if sorted(indices) != list(range(len(indices))):
            raise ValueError(
                "Invalid value for argument `indices`. Expected a permutation of "
                f"range({len(indices)}). Received indices={indices!r}."
            )
        self.indices = indices

    def call(self, inputs):
        return ops.take(inputs, ops.convert_to_tensor(self.indices, "int32"), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config["indices"] = list(self.indices)
        return config
