"""Builds jbn's optional CPU kernel (``jbn._shifted_sums``); everything else is in pyproject.toml.

The kernel is an XLA FFI custom call compiled against the FFI headers that jaxlib
ships. It is optional: where it cannot be built (no C++ compiler), installation goes
on and jbn uses its pure-XLA path, with the same values.
"""

import os

from setuptools import Extension, setup


def _ffi_include_dir() -> str:
    """jaxlib's directory of XLA FFI headers, found without importing jax."""
    import importlib.util

    spec = importlib.util.find_spec("jaxlib")
    return os.path.join(os.path.dirname(spec.origin), "include")


setup(
    ext_modules=[
        Extension(
            "jbn._shifted_sums",
            ["csrc/shifted_sums.cc"],
            include_dirs=[_ffi_include_dir()],
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"],
            language="c++",
            optional=True,
        )
    ],
)
