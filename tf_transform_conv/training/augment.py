"""Image augmentations of the training recipes: per-image crops and flips, per-batch mixing.

The per-image ones (`cifar_train_augment`, `imagenet_train_crop`) are
stateless `tf.image` functions of an explicit seed, so that a training
restarted after a kill sees the same crops as an uninterrupted one (see
`data.training_stream`); `imagenet_eval_crop` is the usual centre crop.
`batch_augment` applies Keras's augmentation layers (`RandomRotation`,
`MixUp`, `CutMix`) to whole batches of `(images, one-hot labels)`.

They build `tf.data` pipelines and import TensorFlow, on any Keras backend.
"""

import keras
import tensorflow as tf

from tf_transform_conv._checks import is_number

__all__ = ["batch_augment", "cifar_train_augment", "imagenet_eval_crop",
           "imagenet_train_crop"]


def cifar_train_augment(image, seed, size=32):
    """Pads 4 pixels, crops a random `size` x `size` window, flips left-right at random.

    The standard CIFAR-10 augmentation, as a stateless function of `seed`.

    Args:
        image: a `(size, size, 3)` image tensor (any dtype).
        seed: a shape `(2,)` integer tensor; the same seed gives the same
            crop and flip.
        size: int, the image's height and width. Defaults to 32.

    Returns:
        The augmented `(size, size, 3)` image, of `image`'s dtype.

    Example:

    >>> import tensorflow as tf
    >>> image = tf.zeros((32, 32, 3), tf.uint8)
    >>> cifar_train_augment(image, tf.constant([0, 1], tf.int64)).shape
    TensorShape([32, 32, 3])
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.resize_with_crop_or_pad(image, size + 8, size + 8)
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def imagenet_train_crop(encoded, seed, size=224):
    """A random resized crop of a JPEG (area 8-100%, aspect 3/4-4/3), resized, flipped.

    The Inception-style ImageNet training crop: only the crop window of the
    JPEG is decoded.

    Args:
        encoded: a scalar string tensor, the JPEG bytes.
        seed: a shape `(2,)` integer tensor; the same seed gives the same
            crop and flip.
        size: int, the output height and width. Defaults to 224.

    Returns:
        A float32 `(size, size, 3)` image in `[0, 255]`.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros((1, 0, 4)), seed=crop_seed, min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, (size, size), method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def imagenet_eval_crop(encoded, size=224):
    """Decodes a JPEG, resizes its shorter side to `size / 0.875`, takes the centre square.

    Args:
        encoded: a scalar string tensor, the JPEG bytes.
        size: int, the output height and width. Defaults to 224.

    Returns:
        A float32 `(size, size, 3)` image in `[0, 255]`.
    """
    image = tf.image.decode_jpeg(encoded, channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = (size / 0.875) / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), tf.int32)
    image = tf.image.resize(image, resized, method="bilinear")
    return tf.image.resize_with_crop_or_pad(image, size, size)


def batch_augment(rotation=0.0, mixup=0.0, cutmix=0.0, seed=0):
    """`(images, one-hot labels) -> (images, labels)` for whole batches, from Keras's layers.

    A random rotation of each image (`keras.layers.RandomRotation`, the
    corners filled by reflection), then MixUp (`keras.layers.MixUp`) or
    CutMix (`keras.layers.CutMix`); with both on, each batch takes one of
    them with equal probability, as DeiT's recipe does. The layers draw
    from their own seeded random streams, which restart with the process.

    Args:
        rotation: float >= 0, the largest rotation, in degrees either way;
            0 turns it off. Defaults to 0.
        mixup: float >= 0, MixUp's alpha; 0 turns it off. Defaults to 0.
        cutmix: float >= 0, CutMix's alpha; 0 turns it off. Defaults to 0.
        seed: int, the seed of the layers (`seed`, `seed + 1`, `seed + 2`).
            Defaults to 0.

    Returns:
        The function, for `tf.data.Dataset.map` over batches of float
        images and one-hot labels; None when all three are off.

    Raises:
        ValueError: if `rotation`, `mixup` or `cutmix` is negative.

    Example:

    >>> import tensorflow as tf
    >>> augment = batch_augment(rotation=15, mixup=0.1)
    >>> images, labels = augment(tf.zeros((4, 8, 8, 3)), tf.one_hot([0, 1, 2, 3], 4))
    >>> images.shape, labels.shape
    (TensorShape([4, 8, 8, 3]), TensorShape([4, 4]))
    >>> batch_augment() is None
    True
    """
    for name, value in (("rotation", rotation), ("mixup", mixup), ("cutmix", cutmix)):
        if not is_number(value) or value < 0:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected a number >= 0. "
                f"Received {name}={value!r}."
            )
    rotate = mix = cut = None
    if rotation:
        rotate = keras.layers.RandomRotation(rotation / 360.0, fill_mode="reflect", seed=seed)
    if mixup:
        mix = keras.layers.MixUp(alpha=mixup, seed=seed + 1)
    if cutmix:
        cut = keras.layers.CutMix(factor=cutmix, seed=seed + 2)
    if rotate is None and mix is None and cut is None:
        return None

    def apply(layer, images, labels):
        out = layer({"images": images, "labels": labels})
        return out["images"], out["labels"]

    def augment(images, labels):
        if rotate is not None:
            images = rotate(images, training=True)
        if mix is not None and cut is not None:
            return tf.cond(tf.random.uniform(()) < 0.5,
                           lambda: apply(mix, images, labels),
                           lambda: apply(cut, images, labels))
        if mix is not None or cut is not None:
            return apply(mix or cut, images, labels)
        return images, labels

    return augment
