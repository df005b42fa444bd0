"""Whether Triton can run here, and decorating kernels in the mode Triton's library is in.

Triton is optional: kernels are decorated only when first used. ``triton.jit`` reads
``TRITON_INTERPRET`` when it decorates a function, not at launch, and Triton decorates its own
library (``tl.sum``, ``tl.max``, ...) when it is first imported, so the interpreter is a
per-process choice: the variable must be set before anything imports triton. A kernel whose mode
does not match the library's is refused with an error rather than failing inside the
interpreter (the CPU tests of kernels run in a child process started with it)."""

from __future__ import annotations

import functools
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch


@functools.cache  # callers ask once a layer; a failed import would search sys.path each time
def triton_available() -> bool:
    """Whether Triton can be imported here (a broken install counts as missing)."""
    try:
        import triton  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _is_interpreted(fn: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return not isinstance(fn, JITFunction)  # the interpreter's InterpretedFunction is no subclass


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter in this process, i.e. ``TRITON_INTERPRET``
    was set when triton was first imported (False without triton)."""
    if not triton_available():
        return False
    import triton.language

    return _is_interpreted(triton.language.sum)


def jit(source: Callable[..., Any], interpreting: bool, **options: Any) -> Any:
    """``triton.jit(source, **options)``, refused if Triton's library runs in the other mode."""
    import triton

    kernel = triton.jit(source, **options)
    if _is_interpreted(kernel) != interpreting:
        raise RuntimeError(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} was changed after "
                           "triton was imported: set it before the process imports triton")
    return kernel


def launch_mode(what: str, device: torch.device, otherwise: str) -> bool:
    """Whether ``what``'s kernels run in the interpreter for tensors on ``device`` (False: compiled,
    on CUDA). Refuses, naming ``otherwise`` as the way out, where Triton is missing, or where the
    tensors are not on CUDA and no interpreter runs."""
    if not triton_available():
        raise RuntimeError(f"{what} needs triton (it comes with CUDA builds of torch); {otherwise}")
    interpreting = interpreter_active()
    if device.type != "cuda" and not interpreting:
        raise RuntimeError(f"{what} needs CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 before the "
                           f"process imports triton, or {otherwise}")
    return interpreting


def on_device(device: torch.device) -> AbstractContextManager[Any]:
    """Triton launches on the current CUDA device, which may not be the tensors': make it theirs."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
