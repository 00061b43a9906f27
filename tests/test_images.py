"""Tests of the image datasets: loading from disk, normalization, augmentation and batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import write_cifar, write_image_folder, write_mnist

from psi_geoopt.experiments.data import DatasetError, load_dataset
from psi_geoopt.experiments.images import ImageDataset, random_crop_flip
from psi_geoopt.experiments.sampling import minibatches


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> tuple[ImageDataset, dict]:
    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar(root, per_file=40)
    return load_dataset("cifar10", root), written


def test_cifar10_from_disk_shapes_labels_and_normalization(cifar):
    dataset, written = cifar
    assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10
    assert dataset.num_train == 200 and len(dataset.test_targets) == 40
    assert torch.equal(dataset.train_targets, torch.from_numpy(written["train"][1]))
    pixels = written["train"][0].transpose(1, 0, 2, 3).reshape(3, -1) / 255
    torch.testing.assert_close(dataset.mean, torch.tensor(pixels.mean(1), dtype=torch.float32))
    torch.testing.assert_close(dataset.std, torch.tensor(pixels.std(1), dtype=torch.float32))
    inputs = dataset.normalize(dataset.train_images)
    assert inputs.dtype == torch.float32
    per_channel = inputs.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(3), atol=1e-5, rtol=0)
    image = written["test"][0][7].astype(np.float64) / 255
    expected = (
        image - dataset.mean.double().numpy()[:, None, None]
    ) / dataset.std.double().numpy()[:, None, None]
    actual = dataset.normalize(dataset.test_images[7:8])[0].double().numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    assert torch.equal(dataset.example_inputs(5), inputs[:5])


def test_the_other_formats_load_with_their_shapes(tmp_path):
    write_mnist(tmp_path / "mnist" / "MNIST" / "raw", gz=True)
    mnist = load_dataset("mnist", tmp_path / "mnist")
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    write_mnist(tmp_path / "fashion")
    assert load_dataset("fashion-mnist", tmp_path / "fashion").num_train == 120
    write_cifar(tmp_path / "c100", num_classes=100, per_file=10)
    cifar100 = load_dataset("cifar100", tmp_path / "c100")
    assert cifar100.num_classes == 100 and cifar100.num_train == 50
    write_image_folder(tmp_path / "folder", train=3, test=2)
    folder = load_dataset("imagefolder", tmp_path / "folder", image_size=8)
    assert folder.input_shape == (3, 8, 8) and folder.num_classes == 3
    assert load_dataset("imagefolder", tmp_path / "folder", image_size=8) is folder


def test_on_disk_datasets_need_an_existing_data_directory(tmp_path):
    with pytest.raises(DatasetError, match=r"needs a data directory \(--data-dir\)"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_random_crop_flip_is_a_shifted_window_possibly_mirrored():
    generator = torch.Generator().manual_seed(0)
    images = torch.arange(40 * 2 * 16 * 16, dtype=torch.int64).reshape(40, 2, 16, 16)
    out = random_crop_flip(images, generator)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for image, result in zip(padded, out, strict=True):
        matches = [
            (top, left, mirror)
            for top, left, mirror in itertools.product(range(5), range(5), (False, True))
            if torch.equal(
                result,
                (lambda w: w.flip(-1) if mirror else w)(image[:, top : top + 16, left : left + 16]),
            )
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert {mirror for *_, mirror in seen} == {False, True}
    assert len({(top, left) for top, left, _ in seen}) > 10


def test_training_batches_follow_the_sampler_and_ignore_the_workers(cifar):
    dataset, _ = cifar
    plain = list(itertools.islice(dataset.train_batches(32, seed=3), 8))
    for (inputs, targets), indices in zip(plain, minibatches(200, 32, 3), strict=False):
        assert torch.equal(inputs, dataset.normalize(dataset.train_images[indices]))
        assert torch.equal(targets, dataset.train_targets[indices])
    augmented = list(itertools.islice(dataset.train_batches(32, 3, augment="crop-flip"), 8))
    assert all(torch.equal(a[1], p[1]) for a, p in zip(augmented, plain, strict=True))
    assert not torch.equal(augmented[0][0], plain[0][0])
    loaded = dataset.train_batches(32, 3, augment="crop-flip", workers=2)
    for (inputs, targets), (expected, expected_targets) in zip(loaded, augmented, strict=False):
        assert torch.equal(inputs, expected) and torch.equal(targets, expected_targets)
    with pytest.raises(ValueError, match="crop-flip"):
        dataset.train_batches(32, 3, augment="mixup")


def test_evaluation_batches_cover_each_split_once_in_order(cifar):
    dataset, _ = cifar
    batches = list(dataset.evaluation_batches("train", 64))
    assert [len(t) for _, t in batches] == [67, 67, 66]
    assert torch.equal(torch.cat([t for _, t in batches]), dataset.train_targets)
    assert torch.equal(torch.cat([x for x, _ in batches]), dataset.normalize(dataset.train_images))
    assert [len(t) for _, t in dataset.evaluation_batches("test", 64)] == [40]
