"""Shared by the interpreter tests: skip the module unless TRITON_INTERPRET is set.

These tests run Triton kernels on CPU tensors through Triton's interpreter, which must be
switched on before triton is imported -- so they run in their own process, started by
``tests/test_triton.py`` with ``TRITON_INTERPRET=1``. Collected by a plain ``pytest`` run they
skip (at module level, before importing anything that imports triton).
"""

import os

import pytest

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def require_interpreter():
    if not INTERPRET:
        pytest.skip("Triton interpreter tests run in their own process with TRITON_INTERPRET=1 "
                    "(see tests/test_triton.py)", allow_module_level=True)
