"""Image augmentations of the training recipes (`tf_transform_conv.training.augment`)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_transform_conv.training import augment


def test_augmentations_keep_shapes_and_follow_their_seed():
    image = tf.cast(tf.random.uniform((32, 32, 3), 0, 255), tf.uint8)
    crops = [augment.cifar_train_augment(image, tf.constant(seed, tf.int64))
             for seed in ([0, 1], [0, 1], [0, 2], [5, 1])]
    assert crops[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(crops[0], crops[1])
    assert any(not np.array_equal(crops[0], other) for other in crops[2:])
    jpeg = tf.io.encode_jpeg(tf.cast(tf.random.uniform((300, 400, 3), 0, 255), tf.uint8))
    seed = tf.constant([3, 4], tf.int64)
    crop = augment.imagenet_train_crop(jpeg, seed, 224)
    assert crop.shape == (224, 224, 3)
    np.testing.assert_array_equal(crop, augment.imagenet_train_crop(jpeg, seed, 224))
    assert augment.imagenet_eval_crop(jpeg, 224).shape == (224, 224, 3)


def test_cifar_crop_is_a_shifted_window_of_the_padded_image():
    """Each output is a 32x32 window of the image padded by 4 zeros, maybe mirrored."""
    image = np.arange(32 * 32 * 3, dtype=np.int32).reshape(32, 32, 3) % 251 + 1
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    for seed in range(6):
        out = np.asarray(augment.cifar_train_augment(tf.constant(image),
                                                     tf.constant([seed, 7], tf.int64)))
        windows = [padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)


def test_eval_crop_is_the_centre_of_the_resized_image():
    # A 256x320 image: the shorter side becomes 224 / 0.875 = 256 (no resize), centre 224.
    image = tf.cast(tf.random.uniform((256, 320, 3), 0, 255), tf.uint8)
    jpeg = tf.io.encode_jpeg(image, quality=100)
    decoded = np.asarray(tf.io.decode_jpeg(jpeg), "float32")
    np.testing.assert_allclose(augment.imagenet_eval_crop(jpeg, 224),
                               decoded[16:240, 48:272], atol=1e-3)


def test_batch_augment_rotates_and_mixes():
    augmented = augment.batch_augment(rotation=15, mixup=0.1, cutmix=1.0, seed=0)
    images = tf.random.uniform((8, 32, 32, 3))
    labels = tf.one_hot(tf.range(8) % 10, 10)
    out_images, out_labels = augmented(images, labels)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    np.testing.assert_allclose(np.sum(out_labels, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(out_images, images)
    assert augment.batch_augment() is None


def test_mixup_alone_mixes_labels_as_images():
    """MixUp: each output is lam * one image + (1 - lam) * another, labels alike."""
    mixed = augment.batch_augment(mixup=1.0, seed=3)
    images = tf.reshape(tf.one_hot(tf.range(4), 4), (4, 1, 1, 4))  # image i = unit vector i
    labels = tf.one_hot(tf.range(4), 4)
    out_images, out_labels = mixed(images, labels)
    np.testing.assert_allclose(np.reshape(out_images, (4, 4)), out_labels, atol=1e-5)


def test_bad_batch_augment_arguments():
    with pytest.raises(ValueError, match=r"`mixup`.*Received mixup=-0.1"):
        augment.batch_augment(mixup=-0.1)
    with pytest.raises(ValueError, match="rotation"):
        augment.batch_augment(rotation="15")
