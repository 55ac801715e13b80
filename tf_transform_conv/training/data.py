"""Image-classification data for the training recipes: the datasets and their `tf.data` pipelines.

Four datasets: CIFAR-10 and ImageNet through TensorFlow Datasets
(`load_tfds`, which says what to download or install when it cannot load
them), scikit-learn's digits (`digits_images`, offline) and random images
(`synthetic_images`, a pipeline check). `training_stream` orders the
training examples as one seeded, endless stream that a restarted training
re-enters at any batch, and `classification_datasets` turns the splits into
batched, augmented, normalised training and test pipelines.

TensorFlow Datasets and scikit-learn are optional dependencies (the
`examples` extra), imported by the functions that read them. The pipelines
are `tf.data` and import TensorFlow, on any Keras backend.
"""

import os
import pathlib

import numpy as np
import tensorflow as tf

from tf_transform_conv._checks import check_positive_int
from tf_transform_conv.training import augment as augment_lib

__all__ = ["DatasetUnavailableError", "MEAN_STD", "NUM_CLASSES", "TFDS_DATASETS",
           "classification_datasets", "digits_images", "load_tfds", "normalize",
           "synthetic_images", "training_stream"]

NUM_CLASSES = {"cifar10": 10, "imagenet2012": 1000, "digits": 10}
TFDS_DATASETS = ("cifar10", "imagenet2012")
# Per-channel statistics of the training images (RGB, in [0, 1]).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMAGENET_MANUAL = (
    "ImageNet (imagenet2012) cannot be downloaded automatically. Download "
    "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
    "https://image-net.org/download-images (a free account is needed) and put "
    "both files, as they are, into {manual}/ ; the first load with this data_dir then "
    "prepares the dataset there (hours, about 300 GB of disk)."
)
CIFAR_OFFLINE = (
    "CIFAR-10 is not prepared in {data_dir} and could not be downloaded ({error}). "
    "On a machine with internet access run\n"
    "    python -c \"import tensorflow_datasets as tfds; tfds.load('cifar10', data_dir='DIR')\"\n"
    "(it fetches https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, 163 MB) and "
    "copy DIR/cifar10/ to {data_dir}/cifar10/, or put cifar-10-binary.tar.gz into "
    "{data_dir}/downloads/manual/."
)
NO_TFDS = ("{dataset} is read with TensorFlow Datasets, which is not installed: pip install "
           "tensorflow-datasets (or pip install -e '.[examples]').")


class DatasetUnavailableError(RuntimeError):
    """A dataset cannot be loaded here: its package is missing, or its files are.

    The message says what to install or download, and where to put it.
    """


def load_tfds(dataset, data_dir=None):
    """CIFAR-10 or ImageNet from TensorFlow Datasets, as unbatched `(image, label)` splits.

    CIFAR-10 is downloaded when missing; ImageNet cannot be (its files need
    an account) and is read from `data_dir`, its JPEGs left encoded for
    `augment.imagenet_train_crop` / `augment.imagenet_eval_crop` to decode
    only what they crop. `tensorflow_datasets` is imported here: it is an
    optional dependency.

    Args:
        dataset: `"cifar10"` or `"imagenet2012"`.
        data_dir: a path, the TensorFlow Datasets folder; None for its
            default, `~/tensorflow_datasets`.

    Returns:
        `(train, test, num_train, num_test)`: the training split and the
        test split (ImageNet's validation split) as `tf.data.Dataset`s of
        `(uint8 image or JPEG string, int64 label)`, and their sizes.

    Raises:
        ValueError: for another `dataset`.
        DatasetUnavailableError: when `tensorflow_datasets` is not
            installed (the message says how to install it), when ImageNet is
            not prepared in `data_dir` (which files to download and where to
            put them), or when CIFAR-10 can neither be found nor downloaded
            (how to fetch it elsewhere and where to copy it).
    """
    if dataset not in TFDS_DATASETS:
        raise ValueError(
            f"Invalid value for argument `dataset`. Expected one of {list(TFDS_DATASETS)}. "
            f"Received dataset={dataset!r}."
        )
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as error:
        if error.name != "tensorflow_datasets":
            raise
        raise DatasetUnavailableError(NO_TFDS.format(dataset=dataset)) from None

    data_dir = None if data_dir is None else os.fspath(data_dir)
    shown = data_dir or os.path.expanduser("~/tensorflow_datasets")
    kwargs = dict(data_dir=data_dir, as_supervised=True, with_info=True)
    try:
        if dataset == "imagenet2012":
            (train, test), info = tfds.load(
                "imagenet2012", split=["train", "validation"], download=False,
                decoders={"image": tfds.decode.SkipDecoding()}, **kwargs,
            )
        else:
            (train, test), info = tfds.load("cifar10", split=["train", "test"], **kwargs)
    except Exception as error:  # tfds raises many kinds when offline or missing
        if dataset == "imagenet2012":
            manual = pathlib.Path(shown) / "downloads" / "manual"
            raise DatasetUnavailableError(
                IMAGENET_MANUAL.format(manual=manual) + f"\n(tfds said: {error}).") from None
        raise DatasetUnavailableError(
            CIFAR_OFFLINE.format(data_dir=shown, error=f"{type(error).__name__}: {error}")
        ) from None
    test_split = "validation" if dataset == "imagenet2012" else "test"
    return train, test, info.splits["train"].num_examples, info.splits[test_split].num_examples


def digits_images(size):
    """scikit-learn's 8x8 digits as `size` x `size` RGB images, split 3:1 for training and test.

    Each digit is upsampled by repetition (nearest neighbour) by
    `size // 8`, padded with black to `size`, and repeated over 3 channels;
    the grey levels 0-16 become 0-255. The split is stratified and fixed
    (`random_state=0`). `sklearn` is imported here: it is an optional
    dependency.

    Args:
        size: int >= 8, the height and width.

    Returns:
        `(x_train, x_test, y_train, y_test)`: uint8 arrays of shape
        `(n, size, size, 3)` and int64 labels 0-9 (1347 and 450 images).

    Example:

    >>> x_train, x_test, y_train, y_test = digits_images(32)
    >>> x_train.shape, x_test.shape, x_train.dtype, sorted(set(y_train.tolist()))[-1]
    ((1347, 32, 32, 3), (450, 32, 32, 3), dtype('uint8'), 9)
    """
    size = check_positive_int(size, "size")
    if size < 8:
        raise ValueError(
            f"Invalid value for argument `size`. Expected an int >= 8 (the digits are 8x8). "
            f"Received size={size!r}."
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype("uint8")
    factor = size // 8
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    pad = size - images.shape[1]
    images = np.pad(images, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    images = np.repeat(images[..., None], 3, axis=-1)
    return train_test_split(images, digits.target.astype("int64"), test_size=0.25,
                            stratify=digits.target, random_state=0)


def synthetic_images(size, count, num_classes, seed):
    """Random uint8 images with random labels: a pipeline check, nothing to learn.

    Args:
        size: int >= 1, the height and width.
        count: int >= 1, the training images; the test split has
            `max(1, count // 4)` more.
        num_classes: int >= 1, the labels are `0 .. num_classes - 1`.
        seed: int, the seed of numpy's generator.

    Returns:
        `(x_train, x_test, y_train, y_test)`: uint8 arrays of shape
        `(n, size, size, 3)` and int64 labels.

    Example:

    >>> x_train, x_test, y_train, y_test = synthetic_images(8, 16, 10, seed=0)
    >>> x_train.shape, x_test.shape, y_test.dtype
    ((16, 8, 8, 3), (4, 8, 8, 3), dtype('int64'))
    """
    size = check_positive_int(size, "size")
    count = check_positive_int(count, "count")
    num_classes = check_positive_int(num_classes, "num_classes")
    rng = np.random.default_rng(seed)
    n_test = max(1, count // 4)
    images = rng.integers(0, 256, (count + n_test, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, count + n_test).astype("int64")
    return images[:count], images[count:], labels[:count], labels[count:]


def normalize(image, mean_std=None):
    """A uint8 image (or batch) to float32: divided by 255, then standardised per channel.

    Args:
        image: a tensor of values in `[0, 255]`, channels last.
        mean_std: `(mean, std)`, per-channel statistics of images in
            `[0, 1]` (`MEAN_STD[dataset]`); None to stop at `[0, 1]`.

    Returns:
        The float32 tensor `(image / 255 - mean) / std`.

    Example:

    >>> import numpy as np
    >>> np.asarray(normalize(np.full((1, 1, 3), 255, np.uint8), ((0.5,) * 3, (0.5,) * 3)))
    array([[[1., 1., 1.]]], dtype=float32)
    """
    image = tf.cast(image, tf.float32) / 255.0
    if mean_std is None:
        return image
    mean, std = mean_std
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def training_stream(examples, num_train, batch_size, seed, start_batch=0, augment=None,
                    window=50_000):
    """The training examples from batch `start_batch` on of one endless, seeded stream.

    The stream is pass after pass over `examples`, cut to whole batches (the
    last `num_train % batch_size` examples of each pass's order sit that pass
    out). Pass `p` permutes the examples within consecutive windows of
    `window` examples (all of them when `num_train <= window`: CIFAR-10,
    digits, synthetic) in an order that depends only on `(seed, p)`, and
    `augment(image, element_seed)`, if given, gets a stateless seed made of
    `(seed, p, index in the pass)`. So the stream is a function of `seed`
    alone: a run restarted after `e` epochs of `s` steps, started at batch
    `e * s`, sees exactly the examples, in the same batches and with the same
    per-image augmentations, as the uninterrupted run did from there.
    Starting there skips only the examples before it in its pass (before
    any decoding or augmentation). The next window is read while the current
    one is served: up to two windows are held in memory (for ImageNet's
    encoded JPEGs, about 11 GB).

    Args:
        examples: an unbatched `tf.data.Dataset` of `(image, label)`.
        num_train: int, the number of examples.
        batch_size: int >= 1, at most `num_train`.
        seed: int, the seed of the orders and augmentations.
        start_batch: int >= 0, the first batch of the stream to serve.
            Defaults to 0.
        augment: `(image, seed) -> image`, a stateless augmentation such as
            `augment.cifar_train_augment`, or None. Defaults to None.
        window: int >= 1, the examples shuffled together. Defaults to
            50,000.

    Returns:
        An unbatched, endless `tf.data.Dataset` of `(image, label)`; batch
        it by `batch_size`.

    Raises:
        ValueError: if `batch_size` is larger than `num_train`, or a count
            is not a positive int.

    Example:

    >>> import tensorflow as tf
    >>> examples = tf.data.Dataset.range(10).map(lambda i: (i, i % 2))
    >>> whole = [int(x) for x, _ in training_stream(examples, 10, 4, seed=0).take(16)]
    >>> resumed = [int(x) for x, _ in training_stream(examples, 10, 4, seed=0,
    ...                                               start_batch=2).take(8)]
    >>> resumed == whole[8:]
    True
    """
    num_train = check_positive_int(num_train, "num_train")
    batch_size = check_positive_int(batch_size, "batch_size")
    window = check_positive_int(window, "window")
    if batch_size > num_train:
        raise ValueError(
            f"Invalid value for argument `batch_size`. Expected at most num_train={num_train}. "
            f"Received batch_size={batch_size}."
        )
    if int(start_batch) < 0:
        raise ValueError(
            "Invalid value for argument `start_batch`. Expected an int >= 0. "
            f"Received start_batch={start_batch!r}."
        )
    per_pass = num_train // batch_size * batch_size
    first_pass, skip = divmod(int(start_batch) * batch_size, per_pass)
    window = min(num_train, window)
    fold_in = tf.random.experimental.stateless_fold_in

    def one_pass(p):
        pass_seed = tf.stack([tf.constant(seed, tf.int64), p])

        def permuted(w, block):
            count = tf.shape(tf.nest.flatten(block)[0])[0]
            order = tf.random.experimental.stateless_shuffle(
                tf.range(count), seed=fold_in(pass_seed, w))
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda j: tf.nest.map_structure(lambda t: t[j], block))

        windows = examples.batch(window).prefetch(1).enumerate()
        ordered = windows.flat_map(permuted).take(per_pass)
        return ordered.enumerate().map(
            lambda i, example: (*example, fold_in(pass_seed, i)))

    stream = tf.data.Dataset.range(first_pass, 2**62).flat_map(one_pass).skip(skip)
    if augment is None:
        return stream.map(lambda x, y, _: (x, y))
    return stream.map(lambda x, y, element_seed: (augment(x, element_seed), y),
                      num_parallel_calls=tf.data.AUTOTUNE)


def classification_datasets(train, test, num_train, dataset, num_classes, batch_size,
                            image_size, seed=0, start_batch=0, batch_augment=None):
    """Batched training and test pipelines of an image-classification dataset.

    Training: the batches of `training_stream` from `start_batch` on (a
    restart continues the data of the run it continues), each image
    augmented as its dataset is (`"cifar10"`: pad, crop, flip;
    `"imagenet2012"`: random resized crop and flip of the JPEG; digits and
    synthetic images: none, digits are not flip-invariant), normalised
    (`MEAN_STD`, or to `[0, 1]`), labels one-hot, full batches only (one
    batch shape, so XLA compiles the step once), then `batch_augment` on
    each batch. Test: one pass, ImageNet centre-cropped, normalised alike,
    the last batch partial. Both prefetch and shard by data across workers
    (`AutoShardPolicy.DATA`).

    Args:
        train: an unbatched `tf.data.Dataset` of `(uint8 image or JPEG
            string, int label)`, the training split (`load_tfds`, or
            `tf.data.Dataset.from_tensor_slices` of `digits_images` /
            `synthetic_images`).
        test: the same for the test split.
        num_train: int, the size of `train`.
        dataset: the dataset's name: `"cifar10"`, `"imagenet2012"`, or any
            other for images used as they are.
        num_classes: int, the size of the one-hot labels.
        batch_size: int, the global batch size, at most `num_train`.
        image_size: int, the height and width of the images (ImageNet's are
            cropped to it).
        seed: int, the seed of `training_stream`. Defaults to 0.
        start_batch: int, the first training batch. Defaults to 0.
        batch_augment: `(images, labels) -> (images, labels)` applied to
            training batches (`augment.batch_augment`), or None.

    Returns:
        `(train, test)`: the endless training pipeline and the test one, of
        `(float32 images, float32 one-hot labels)` batches.

    Example:

    >>> import tensorflow as tf
    >>> x_train, x_test, y_train, y_test = synthetic_images(8, 16, 10, seed=0)
    >>> splits = [tf.data.Dataset.from_tensor_slices(s) for s in
    ...           ((x_train, y_train), (x_test, y_test))]
    >>> train, test = classification_datasets(*splits, 16, "synthetic", 10, batch_size=4,
    ...                                       image_size=8)
    >>> [tuple(t.shape) for t in next(iter(train))]
    [(4, 8, 8, 3), (4, 10)]
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    image_size = check_positive_int(image_size, "image_size")
    autotune = tf.data.AUTOTUNE
    mean_std = MEAN_STD.get(dataset)
    test_map = None
    if dataset == "imagenet2012":
        def augment(x, element_seed):
            return augment_lib.imagenet_train_crop(x, element_seed, image_size)

        def test_map(x, y):
            return augment_lib.imagenet_eval_crop(x, image_size), y
    elif dataset == "cifar10":
        def augment(x, element_seed):
            return augment_lib.cifar_train_augment(x, element_seed, image_size)
    else:
        augment = None

    def finish(x, y):
        return normalize(x, mean_std), tf.one_hot(y, num_classes)

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train = training_stream(train, num_train, batch_size, seed, start_batch, augment)
    train = (train.map(finish, num_parallel_calls=autotune)
             .batch(batch_size, drop_remainder=True))
    if batch_augment is not None:
        train = train.map(batch_augment, num_parallel_calls=autotune)
    train = train.prefetch(autotune).with_options(options)
    if test_map is not None:
        test = test.map(test_map, num_parallel_calls=autotune)
    test = (test.map(finish, num_parallel_calls=autotune)
            .batch(batch_size).prefetch(autotune).with_options(options))
    return train, test
