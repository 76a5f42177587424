"""Where onnxq's compiled libraries are: the op library for onnxruntime (libonnxq_ops.so) and the counting one.

They are inside the imported package, else inside the installed distribution: the second place is where they are
when ``onnxq`` is imported from a source checkout (e.g. ``python -m pytest`` at the repository root), which holds no
compiled code, after ``pip install .``.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata, resources
from pathlib import Path

from onnxq.errors import OnnxqError


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


LIBRARY_NAME = "libonnxq_ops.so"


#: Environment variable naming another build of the op library to load instead of the installed one
#: (tests/test_sanitizers.py points it at a build under AddressSanitizer/UBSan).
LIBRARY_ENV = "ONNXQ_OPS_LIBRARY"


def get_library_path() -> str:
    """Path of onnxq's onnxruntime custom-op library, for ``SessionOptions.register_custom_ops_library``.

    The environment variable ``ONNXQ_OPS_LIBRARY``, when set and not empty, names the library file to
    use instead of the installed one: another build of it, e.g. one under sanitizers.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        if not Path(override).is_file():
            raise OnnxqError(override, f"no such op library file (named by the environment variable {LIBRARY_ENV})")
        return os.path.abspath(override)
    path = find_built(LIBRARY_NAME)
    if path is None:
        raise OnnxqError(None, f"onnxq's op library {LIBRARY_NAME} is missing: onnxq was not built; reinstall it with `pip install .`")
    return str(path)
