"""Shared helpers of the scan tests: running Triton kernels under the CPU interpreter whatever the import order."""

from __future__ import annotations

import sys

import pytest


def interpret_triton_stdlib(patch: pytest.MonkeyPatch) -> None:
    """Triton's own @jit helpers (tl.zeros, tl.sum, tl.cumsum, ...) are built for the interpreter only when
    TRITON_INTERPRET=1 is set before triton.language is first imported; if another test imported it first, swap
    them for interpreted copies for the duration of `patch`."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                swapped.setdefault(id(value), InterpretedFunction(value.fn))
                patch.setattr(module, attr, swapped[id(value)])
