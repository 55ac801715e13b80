"""Datasets and `tf.data` pipelines of the training recipes (`tf_transform_conv.training.data`)."""

import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_transform_conv.training import data


def test_a_resumed_stream_continues_the_uninterrupted_one():
    """From any batch, the stream is the uninterrupted one's; each pass a new permutation."""
    examples = tf.data.Dataset.range(10).map(lambda i: (i, i % 3))
    augment = lambda x, seed: x * 1000 + seed[1] % 1000  # noqa: E731  (seeded "augmentation")
    whole = [int(x) for x, _ in data.training_stream(examples, 10, 4, 7, augment=augment)
             .take(40)]
    for start in (1, 2, 5):
        resumed = [int(x) for x, _ in data.training_stream(
            examples, 10, 4, 7, start_batch=start, augment=augment).take(12)]
        assert resumed == whole[4 * start:4 * start + 12], start
    # Passes of 2 batches (the 2 examples left over sit each pass out), each a new order.
    passes = [sorted(x // 1000 for x in whole[k:k + 8]) for k in range(0, 40, 8)]
    assert all(len(set(p)) == 8 and set(p) <= set(range(10)) for p in passes)
    orders = {tuple(x // 1000 for x in whole[k:k + 8]) for k in range(0, 40, 8)}
    assert len(orders) > 1
    other_seed = [int(x) for x, _ in data.training_stream(examples, 10, 4, 8).take(8)]
    assert other_seed != [x // 1000 for x in whole[:8]]


def test_stream_shuffles_within_windows():
    examples = tf.data.Dataset.range(12).map(lambda i: (i, i))
    first = [int(x) for x, _ in data.training_stream(examples, 12, 4, 0, window=4).take(12)]
    assert [sorted(first[k:k + 4]) for k in (0, 4, 8)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                           [8, 9, 10, 11]]


def test_bad_stream_arguments():
    examples = tf.data.Dataset.range(4).map(lambda i: (i, i))
    with pytest.raises(ValueError, match=r"`batch_size`.*at most num_train=4"):
        data.training_stream(examples, 4, 8, 0)
    with pytest.raises(ValueError, match="start_batch"):
        data.training_stream(examples, 4, 2, 0, start_batch=-1)


def splits(x_train, x_test, y_train, y_test):
    return (tf.data.Dataset.from_tensor_slices((x_train, y_train)),
            tf.data.Dataset.from_tensor_slices((x_test, y_test)))


def test_pipelines_batch_normalise_and_one_hot():
    x_train, x_test, y_train, y_test = data.synthetic_images(8, 20, 10, seed=1)
    train, test = data.classification_datasets(*splits(x_train, x_test, y_train, y_test), 20,
                                               "synthetic", 10, batch_size=8, image_size=8)
    images, labels = next(iter(train))
    assert images.shape == (8, 8, 8, 3) and labels.shape == (8, 10)
    assert images.dtype == tf.float32 and 0.0 <= float(tf.reduce_min(images))
    assert float(tf.reduce_max(images)) <= 1.0
    np.testing.assert_array_equal(np.sum(labels, axis=1), 1.0)
    batches = list(test.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [5]  # one pass, the last batch partial
    np.testing.assert_allclose(batches[0][0], x_test / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(batches[0][1].argmax(1), y_test)


def test_cifar_pipeline_standardises_per_channel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 16)
    _, test = data.classification_datasets(*splits(x, x, y, y), 16, "cifar10", 10,
                                           batch_size=16, image_size=32)
    images, _ = next(iter(test))
    mean, std = data.MEAN_STD["cifar10"]
    np.testing.assert_allclose(images, (x / 255.0 - np.array(mean)) / np.array(std),
                               rtol=1e-5, atol=1e-5)


def test_digits_and_synthetic_images():
    x_train, x_test, y_train, y_test = data.digits_images(16)
    assert x_train.shape == (1347, 16, 16, 3) and x_test.shape == (450, 16, 16, 3)
    assert x_train.dtype == np.uint8 and x_train.max() == 255
    assert sorted(set(y_train.tolist())) == list(range(10))
    np.testing.assert_array_equal(x_train[..., 0], x_train[..., 2])  # grey, as RGB
    padded, *_ = data.digits_images(20)  # 8 * 2 = 16, padded 2 on each side
    assert padded.shape[1:] == (20, 20, 3) and not padded[:, :2].any()
    with pytest.raises(ValueError, match=r"`size`.*Received size=4"):
        data.digits_images(4)
    a = data.synthetic_images(4, 9, 3, seed=0)
    b = data.synthetic_images(4, 9, 3, seed=0)
    assert [len(part) for part in a] == [9, 2, 9, 2] and max(a[2]) < 3
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_load_tfds_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(data.DatasetUnavailableError, match="pip install tensorflow-datasets"):
        data.load_tfds("cifar10")


def test_imagenet_without_files_says_what_to_download(tmp_path):
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_tfds("imagenet2012", tmp_path)
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert str(tmp_path / "downloads" / "manual") in message


def test_cifar_offline_says_what_to_download(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_tfds("cifar10", tmp_path)
    assert "cifar-10-binary.tar.gz" in str(error.value) and str(tmp_path) in str(error.value)
    assert "ConnectionError: no network" in str(error.value)
    with pytest.raises(ValueError, match=r"`dataset`.*Received dataset='mnist'"):
        data.load_tfds("mnist")
