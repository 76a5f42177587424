"""Where onnxq's compiled libraries are: inside the imported package, else inside the installed distribution.

The second place is where they are when ``onnxq`` is imported from a source checkout (e.g.
``python -m pytest`` at the repository root), which holds no compiled code, after ``pip install .``.
"""

from __future__ import annotations

import functools
from importlib import metadata, resources
from pathlib import Path


@functools.cache
def find_built(name: str) -> Path | None:
    """The built library file ``name`` (e.g. ``libonnxq_ops.so``), or None when onnxq was not built."""
    packaged = Path(str(resources.files("onnxq") / name))
    if packaged.is_file():
        return packaged
    try:
        installed = Path(str(metadata.distribution("onnxq").locate_file(f"onnxq/{name}")))
    except metadata.PackageNotFoundError:
        return None
    return installed if installed.is_file() else None
