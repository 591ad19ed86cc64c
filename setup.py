"""Builds the Cython kernels from ext/ into the engine.kernels package.

All project metadata lives in pyproject.toml; this file only declares the extensions.
Set TXENGINE_DEBUG=1 to compile with bounds checks and assertions enabled.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("TXENGINE_DEBUG") == "1"

KERNELS = ("balance", "routing", "copy", "events", "fee", "wire")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

extensions = [
    Extension(
        f"engine.kernels._{name}",
        [f"ext/{name}.pyx"],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
    )
    for name in KERNELS
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, include_path=["ext"]))
