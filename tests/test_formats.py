"""Tests of the on-disk dataset readers on small files written in each format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import write_cifar, write_idx, write_image_folder, write_mnist

from psi_geoopt.experiments.formats import (
    DatasetError,
    read_cifar10,
    read_cifar100,
    read_image_folder,
    read_mnist,
)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_reads_batches_in_order(tmp_path, bytes_keys):
    written = write_cifar(tmp_path, per_file=30, bytes_keys=bytes_keys)
    splits = read_cifar10(tmp_path)
    assert splits.train_images.shape == (150, 3, 32, 32) and splits.train_images.dtype == np.uint8
    assert np.array_equal(splits.train_images, written["train"][0])
    assert np.array_equal(splits.train_labels, written["train"][1])
    assert np.array_equal(splits.test_images, written["test"][0])
    assert np.array_equal(splits.test_labels, written["test"][1])
    assert splits.train_labels.dtype == np.int64
    assert splits.classes == tuple(f"class{i}" for i in range(10))
    # the directory holding the batches directly works too
    assert np.array_equal(
        read_cifar10(tmp_path / "cifar-10-batches-py").test_images, splits.test_images
    )


def test_cifar_pixel_layout_is_channel_major(tmp_path):
    """Row 0 of a batch: 1024 red values, then green, then blue, each row-major (torchvision's
    ``reshape(-1, 3, 32, 32)``)."""
    write_cifar(tmp_path, per_file=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["data"][0] = np.arange(3072) % 251
    path.write_bytes(pickle.dumps(entry, protocol=2))
    image = read_cifar10(tmp_path).test_images[0]
    assert image[1, 0, 0] == 1024 % 251 and image[0, 1, 2] == 34 and image[2, 31, 31] == 3071 % 251


def test_cifar100_uses_the_fine_labels(tmp_path):
    written = write_cifar(tmp_path, num_classes=100, per_file=20)
    splits = read_cifar100(tmp_path)
    assert splits.train_images.shape == (100, 3, 32, 32) and len(splits.classes) == 100
    assert np.array_equal(splits.train_labels, written["train"][1])
    assert splits.train_labels.max() >= 20  # fine, not coarse (at most 19)


@pytest.mark.parametrize("layout", ["flat", "gz", "torchvision"])
def test_mnist_idx_files(tmp_path, layout):
    directory = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    written = write_mnist(directory, gz=layout == "gz")
    splits = read_mnist(tmp_path)
    assert splits.train_images.shape == (120, 1, 28, 28) and splits.test_images.shape[0] == 40
    assert np.array_equal(splits.train_images[:, 0], written["train"][0])
    assert np.array_equal(splits.test_labels, written["test"][1])
    assert splits.test_labels.dtype == np.int64


def test_fashion_mnist_uses_its_own_torchvision_folder(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw")
    assert read_mnist(tmp_path, "FashionMNIST").train_images.shape == (120, 1, 28, 28)
    with pytest.raises(DatasetError, match="mnist: expected the files train-images-idx3-ubyte"):
        read_mnist(tmp_path, "MNIST")


def test_image_folder_classes_resize_and_crop(tmp_path):
    write_image_folder(tmp_path, train=4, test=2, size=(12, 8))
    splits = read_image_folder(tmp_path, image_size=6)
    assert splits.classes == ("cat", "dog", "frog")
    assert splits.train_images.shape == (12, 3, 6, 6) and splits.test_images.shape == (6, 3, 6, 6)
    assert splits.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the shorter side (8) is resized to 6, the longer (12) to 9, then the centre is cut
    from PIL import Image

    with Image.open(tmp_path / "train" / "dog" / "001.png") as image:
        expected = np.asarray(image.resize((9, 6), Image.Resampling.BILINEAR))[:, 1:7]
    assert np.array_equal(splits.train_images[5], expected.transpose(2, 0, 1))


def test_image_folder_val_split_and_classes_of_the_training_split(tmp_path):
    write_image_folder(tmp_path, train=2, test=2)
    (tmp_path / "test").rename(tmp_path / "val")
    for image in (tmp_path / "val" / "cat").iterdir():
        image.unlink()
    (tmp_path / "val" / "cat").rmdir()
    splits = read_image_folder(tmp_path, image_size=4)
    assert splits.test_labels.tolist() == [1, 1, 2, 2]  # dog, frog keep the training indices


def _corrupt_cifar_meta(tmp_path):
    write_cifar(tmp_path, per_file=2)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"not a pickle")


def _cifar_pickle_with_code(tmp_path):
    write_cifar(tmp_path, per_file=2)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as file:
        pickle.dump({"data": print}, file, protocol=2)


def _cifar_wrong_shape(tmp_path):
    write_cifar(tmp_path, per_file=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))


def _cifar_bad_labels(tmp_path):
    write_cifar(tmp_path, per_file=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))


def _cifar_missing_batch(tmp_path):
    write_cifar(tmp_path, per_file=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").unlink()


def _mnist_wrong_type(tmp_path):
    write_mnist(tmp_path)
    data = bytearray((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    data[2] = 0x0D  # float
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes(data))


def _mnist_truncated(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])


def _mnist_label_count(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(7, np.uint8))


def _folder_corrupt_image(tmp_path):
    write_image_folder(tmp_path, train=2, test=1)
    (tmp_path / "train" / "dog" / "001.png").write_bytes(b"\x89PNG broken")


def _folder_empty_class(tmp_path):
    write_image_folder(tmp_path, train=2, test=1)
    (tmp_path / "train" / "empty").mkdir()


def _folder_unknown_test_class(tmp_path):
    write_image_folder(tmp_path, train=2, test=1)
    (tmp_path / "test" / "horse").mkdir()


def _folder_no_test(tmp_path):
    write_image_folder(tmp_path, train=2, test=1)
    (tmp_path / "test").rename(tmp_path / "holdout")


@pytest.mark.parametrize(
    "prepare, read, message",
    [
        (lambda p: None, read_cifar10, "cifar10: expected the files data_batch_1, data_batch_2"),
        (_cifar_missing_batch, read_cifar10, "cifar-10-batches-py' lacks data_batch_5"),
        (_corrupt_cifar_meta, read_cifar10, "batches.meta is not a CIFAR python pickle"),
        (_cifar_pickle_with_code, read_cifar10, "refusing to load __builtin__.print"),
        (_cifar_wrong_shape, read_cifar10, "'data' must be a uint8 array (N, 3072)"),
        (_cifar_bad_labels, read_cifar10, "labels must lie in [0, 10), got [0, 10]"),
        (lambda p: write_cifar(p, per_file=2), read_cifar100, "cifar100: expected the files train"),
        (_mnist_wrong_type, read_mnist, "type code 0x0d"),
        (_mnist_truncated, read_mnist, "the file holds 94075"),
        (_mnist_label_count, read_mnist, "expected 120 integer labels"),
        (_folder_corrupt_image, read_image_folder, "cannot decode the image"),
        (_folder_empty_class, read_image_folder, "the class folder(s) empty hold no file"),
        (_folder_unknown_test_class, read_image_folder, "has classes that"),
        (_folder_no_test, read_image_folder, "expected the directories"),
    ],
)
def test_missing_and_malformed_files_get_one_line_errors(tmp_path, prepare, read, message):
    prepare(tmp_path)
    arguments = (tmp_path, 8) if read is read_image_folder else (tmp_path,)
    with pytest.raises(DatasetError) as error:
        read(*arguments)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
