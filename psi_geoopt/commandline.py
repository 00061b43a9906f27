"""Command-line plumbing shared by the ``psi-geoopt`` sub-commands.

Argument types that reject bad numbers at parse time, the early check of the output directory,
atomic JSON writes, plain-text tables and the description of the machine that results are
recorded with.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "add_common_arguments",
    "check_output_directory",
    "format_table",
    "machine_description",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "write_json_atomically",
]


def _parse(text: str, kind: type, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return value


def positive_int(text: str) -> int:
    """An ``int`` >= 1 (argparse type)."""
    value = _parse(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An ``int`` >= 0 (argparse type)."""
    value = _parse(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite ``float`` > 0 (argparse type)."""
    value = _parse(text, float, "a positive number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite ``float`` >= 0 (argparse type)."""
    value = _parse(text, float, "a non-negative number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text!r}")
    return value


def batch_size(text: str) -> int:
    """An ``int`` >= 2: BatchNorm needs two samples per batch (argparse type)."""
    value = _parse(text, int, "an integer >= 2")
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (BatchNorm), got {text!r}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--threads``, shared by the training sub-commands."""
    parser.add_argument(
        "--batch-size", type=batch_size, default=64, help="minibatch size (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads; results are reproducible for a given seed and thread count "
        "(default: %(default)s)",
    )


def check_output_directory(directory: Path) -> str | None:
    """Create ``directory`` if needed and check it is writable; the reason if not, else None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        return f"output directory {str(directory)!r} is not writable: {reason}"
    return None


def write_json_atomically(path: Path, content: object) -> None:
    """Write ``content`` as JSON to ``path`` through a temporary file and a rename, so that an
    interruption leaves either the old file or the new one, never a partial one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)
        with os.fdopen(descriptor, "w") as file:
            json.dump(content, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def machine_description(device: str = "cpu") -> dict[str, object]:
    """What a measurement depends on: processor, cores, threads, platform, the versions of
    Python and of the packages on the computation path, and the GPU where ``device`` is one.

    Every sub-command that records results (``bench``, ``compare``, ``verify``) records this.
    """
    info: dict[str, object] = {
        "cpu": _processor_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: _version_of(package) for package in _PACKAGES},
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


_PACKAGES = ("psi-geoopt", "torch", "geoopt", "numpy", "numba", "adamp")


def _processor_name() -> str:
    """The model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version_of(package: str) -> str | None:
    """The installed version of ``package``, ``None`` where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
