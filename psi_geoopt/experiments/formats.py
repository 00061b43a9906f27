r"""Readers of the standard on-disk image datasets, without download and without torchvision.

Each reader returns the two splits as ``uint8`` arrays ``(N, C, H, W)`` with ``int64`` labels,
exactly as torchvision's ``CIFAR10``/``CIFAR100``/``MNIST``/``FashionMNIST``/``ImageFolder``
read the same files, and raises :class:`DatasetError` with a one-line message naming the
expected files when they are missing or not in the format:

- **CIFAR-10** (the "python version" archive): ``data_batch_1`` … ``data_batch_5``,
  ``test_batch`` and ``batches.meta`` in ``cifar-10-batches-py/`` (or in the directory
  itself). Each batch is a pickled dict with ``data``, a ``uint8`` array ``(N, 3072)`` of
  channel-major 32x32 RGB images, and ``labels``; ``batches.meta`` holds ``label_names``.
- **CIFAR-100**: ``train``, ``test`` and ``meta`` in ``cifar-100-python/``; the labels are
  the 100 ``fine_labels``, the names ``fine_label_names``.
- **MNIST / Fashion-MNIST**: the IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
  possibly gzipped, ``.gz``) in the directory, in torchvision's ``MNIST/raw/`` or
  ``FashionMNIST/raw/``. An IDX file is a big-endian header — two zero bytes, the type code
  ``0x08`` (unsigned byte), the number of dimensions — one 32-bit size per dimension, then the
  values.
- **Image folder**: ``train/CLASS/…`` and ``test/CLASS/…`` (or ``val/CLASS/…``), one
  sub-directory per class, searched recursively for ``.jpg .jpeg .png .ppm .bmp .pgm .tif
  .tiff .webp`` files (any case); classes are the sorted names of the training
  sub-directories, numbered from 0. Every image is decoded with Pillow, converted to RGB,
  resized so that its shorter side is ``image_size`` (bilinear) and cropped to the central
  ``image_size`` x ``image_size`` square.

The pickles of CIFAR are read with an unpickler that only builds dicts, lists, strings,
numbers and NumPy arrays, so a file that is not a CIFAR batch cannot run code.
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageSplits",
    "read_cifar10",
    "read_cifar100",
    "read_image_folder",
    "read_mnist",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CIFAR_SIDE = 32
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UNSIGNED_BYTE = 0x08


class DatasetError(ValueError):
    """A dataset that is missing or not in its format; the message is one line."""


@dataclass(frozen=True)
class ImageSplits:
    """Training and test images, ``uint8`` ``(N, C, H, W)``, labels ``int64`` in
    ``[0, len(classes))``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]


def _plain_file(directory: Path, name: str) -> Path | None:
    path = directory / name
    return path if path.is_file() else None


def _locate(
    what: str,
    candidates: Sequence[Path],
    names: Sequence[str],
    find: Callable[[Path, str], Path | None] = _plain_file,
) -> list[Path]:
    """The files ``names`` in the first of ``candidates`` that holds them all."""
    incomplete = None
    for directory in candidates:
        paths = [find(directory, name) for name in names]
        if all(path is not None for path in paths):
            return paths
        if incomplete is None and any(path is not None for path in paths):
            missing = [name for name, path in zip(names, paths, strict=True) if path is None]
            incomplete = f"{what}: {str(directory)!r} lacks {', '.join(missing)}"
    places = " or ".join(repr(str(directory)) for directory in candidates)
    raise DatasetError(incomplete or f"{what}: expected the files {', '.join(names)} in {places}")


# ------------------------------------------------------------------------------------ CIFAR


def _pickle_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled NumPy array refers to, under NumPy 1 and 2 module names."""
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 with protocol < 3
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray", "_reconstruct"] = np.zeros(1).__reduce__()[0]
        allowed[f"{core}.multiarray", "scalar"] = np.int64(0).__reduce__()[0]
        allowed[f"{core}.numeric", "_frombuffer"] = np.zeros(1).__reduce_ex__(5)[0]
    return allowed


_PICKLE_GLOBALS = _pickle_globals()


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only the objects of a CIFAR pickle: containers, numbers, strings, NumPy arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _load_pickle(path: Path) -> dict[str, object]:
    """The dict of a CIFAR pickle, its keys as ``str`` (files written by Python 2, as the
    originals, load with ``latin1`` like torchvision does; ``bytes`` keys are decoded)."""
    try:
        with path.open("rb") as file:
            content = _ArrayUnpickler(file, encoding="latin1").load()
    except Exception as error:  # any unpickling failure means "not this format"
        raise DatasetError(f"{path} is not a CIFAR python pickle ({error})") from None
    if not isinstance(content, dict):
        raise DatasetError(f"{path} is not a CIFAR python pickle (no dict inside)")
    return {
        key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()
    }


def _entry(content: dict, key: str, path: Path) -> object:
    if key not in content:
        raise DatasetError(f"{path} has no {key!r} entry (keys: {', '.join(map(str, content))})")
    return content[key]


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    content = _load_pickle(path)
    data = np.asarray(_entry(content, "data", path))
    labels = np.asarray(_entry(content, label_key, path))
    pixels = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DatasetError(
            f"{path}: 'data' must be a uint8 array (N, {pixels}), got {data.dtype} {data.shape}"
        )
    _check_labels(labels, len(data), num_classes, path)
    images = data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE)
    return images, labels.astype(np.int64)


def _check_labels(labels: np.ndarray, count: int, num_classes: int, source: Path) -> None:
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{source}: expected {count} integer labels, got {labels.dtype} {labels.shape}"
        )
    if count and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(
            f"{source}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def _read_cifar(
    directory: Path,
    what: str,
    folder: str,
    train_files: Sequence[str],
    test_file: str,
    meta: tuple[str, str],
    label_key: str,
) -> ImageSplits:
    *train_paths, test_path, meta_path = _locate(
        what, [directory / folder, directory], [*train_files, test_file, meta[0]]
    )
    classes = tuple(str(name) for name in _entry(_load_pickle(meta_path), meta[1], meta_path))
    train = [_cifar_batch(path, label_key, len(classes)) for path in train_paths]
    test_images, test_labels = _cifar_batch(test_path, label_key, len(classes))
    return ImageSplits(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
        classes,
    )


def read_cifar10(directory: Path) -> ImageSplits:
    """CIFAR-10 from ``directory/cifar-10-batches-py`` (or ``directory``)."""
    return _read_cifar(
        Path(directory),
        "cifar10",
        "cifar-10-batches-py",
        [f"data_batch_{index}" for index in range(1, 6)],
        "test_batch",
        ("batches.meta", "label_names"),
        "labels",
    )


def read_cifar100(directory: Path) -> ImageSplits:
    """CIFAR-100 (fine labels) from ``directory/cifar-100-python`` (or ``directory``)."""
    return _read_cifar(
        Path(directory),
        "cifar100",
        "cifar-100-python",
        ["train"],
        "test",
        ("meta", "fine_label_names"),
        "fine_labels",
    )


# -------------------------------------------------------------------------------- MNIST


def _read_idx(path: Path, dimensions: int) -> np.ndarray:
    """An unsigned-byte IDX array with ``dimensions`` axes (big-endian header)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = bytearray(file.read())  # writable, for torch.from_numpy
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    header = 4 * (dimensions + 1)
    if len(data) < header or data[:2] != b"\0\0":
        raise DatasetError(f"{path} is not an IDX file (its first two bytes must be zero)")
    if data[2] != _IDX_UNSIGNED_BYTE or data[3] != dimensions:
        raise DatasetError(
            f"{path}: expected an unsigned-byte IDX array with {dimensions} dimension(s), got "
            f"type code {data[2]:#04x} with {data[3]} dimension(s)"
        )
    shape = tuple(int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, dimensions + 1))
    if len(data) != header + int(np.prod(shape)):
        raise DatasetError(
            f"{path}: the header announces {shape} = {int(np.prod(shape))} values, the file holds "
            f"{len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_mnist(directory: Path, variant: str = "MNIST") -> ImageSplits:
    """MNIST (``variant="MNIST"``) or Fashion-MNIST (``"FashionMNIST"``) IDX files from
    ``directory`` or ``directory/VARIANT/raw`` (torchvision's layout)."""
    directory = Path(directory)
    what = {"MNIST": "mnist", "FashionMNIST": "fashion-mnist"}[variant]
    names = [name for pair in _MNIST_FILES.values() for name in pair]
    paths = _locate(what, [directory, directory / variant / "raw"], names, _idx_path)
    arrays = {}
    for split, (images_path, labels_path) in zip(_MNIST_FILES, (paths[:2], paths[2:]), strict=True):
        images = _read_idx(images_path, 3)
        labels = _read_idx(labels_path, 1)
        _check_labels(labels, len(images), 10, labels_path)
        arrays[split] = images[:, None], labels.astype(np.int64)
    return ImageSplits(*arrays["train"], *arrays["test"], classes=tuple(map(str, range(10))))


# ------------------------------------------------------------------------- image folder


def _image_files(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, class index)`` of every image under ``root/CLASS`` (sorted, recursive)."""
    samples = []
    for index, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for folder, _, files in sorted(os.walk(class_dir, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((Path(folder) / file, index))
    return samples


def _decode(path: Path, size: int) -> np.ndarray:
    """One image as ``uint8`` ``(3, size, size)``: RGB, shorter side resized, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = size / min(image.size)
            width = max(size, round(image.width * scale))
            height = max(size, round(image.height * scale))
            if (width, height) != image.size:
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DatasetError(f"cannot decode the image {path}: {error}") from None


def _decode_all(samples: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda sample: _decode(sample[0], size), samples))
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return np.stack(images), labels


def read_image_folder(directory: Path, image_size: int) -> ImageSplits:
    """A class-per-folder tree: ``directory/train/CLASS/*`` and ``directory/test/CLASS/*``
    (``val/`` where there is no ``test/``), decoded to ``image_size`` x ``image_size`` RGB."""
    directory = Path(directory)
    train_root = directory / "train"
    test_root = next((directory / s for s in ("test", "val") if (directory / s).is_dir()), None)
    if not train_root.is_dir() or test_root is None:
        raise DatasetError(
            f"imagefolder: expected the directories {str(train_root)!r} and "
            f"{str(directory / 'test')!r} (or {str(directory / 'val')!r}), one sub-directory "
            "per class"
        )
    classes = sorted(entry.name for entry in os.scandir(train_root) if entry.is_dir())
    test_classes = sorted(entry.name for entry in os.scandir(test_root) if entry.is_dir())
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DatasetError(
            f"imagefolder: {test_root} has classes that {train_root} lacks: {', '.join(unknown)}"
        )
    train = _image_files(train_root, classes)
    empty = sorted(set(classes) - {classes[label] for _, label in train})
    if not classes or empty:
        what = f"the class folder(s) {', '.join(empty)} hold" if empty else "it has"
        raise DatasetError(
            f"imagefolder: no image in {train_root} ({what} no file ending in "
            f"{' '.join(IMAGE_EXTENSIONS)})"
        )
    test = _image_files(test_root, classes)
    if not test:
        raise DatasetError(f"imagefolder: no image in the class folders of {test_root}")
    return ImageSplits(
        *_decode_all(train, image_size), *_decode_all(test, image_size), classes=tuple(classes)
    )
