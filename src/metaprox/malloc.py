"""Keep freed memory inside the process (glibc), so large tensors reuse pages instead of faulting in new ones.

Why: glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB on 64-bit Linux) with a
fresh ``mmap`` and returns it to the kernel with ``munmap`` when it is freed. A Conv-4 gradient on
miniImageNet shapes (5 tasks × 75 images of 84×84) allocates and frees tens of activation tensors of
68–340 MB per inner step, so every step maps new memory, which the kernel zero-fills page by page (one page
fault per 4 KiB). Measured with ``metaprox bench miniimagenet``: half of the CPU time of an outer iteration
was *system* time, and it drops to a few percent with the setting below.

:func:`retain_freed_memory` calls glibc's ``mallopt`` once: ``M_MMAP_MAX = 0`` (large blocks come from the heap,
where freed blocks are reused) and ``M_TRIM_THRESHOLD`` = 2 GiB, the largest ``mallopt`` accepts (the heap is
not shrunk after every free). The cost: the process keeps its peak heap size until it exits (its RSS no longer
falls after a large temporary is freed). This is process-wide, so the library never applies it on import: the
``metaprox`` command applies it for ``train``, ``eval`` and ``compare`` (set ``METAPROX_MALLOC=system`` to opt
out), and a program that owns its process may call it itself. On other C libraries (macOS, musl) it does
nothing.
The same effect before start-up: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
A freed block is reused by a later request that fits in it; a request of exactly the same size can miss it by
memalign's padding when a small allocation sits right after it (torch asks for 64-byte alignment), so an
allocate-free loop of one size may still grow the heap — see tests/test_malloc.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["retain_freed_memory", "OPT_OUT_ENV"]

OPT_OUT_ENV = "METAPROX_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameter numbers from glibc's <malloc.h>
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int

_applied = False


def retain_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory (see the module docstring). True if the setting is in effect.

    Returns False (and changes nothing) where the C library is not glibc, or when the environment variable
    ``METAPROX_MALLOC`` is ``system``. Calling it again is harmless.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    _applied = ok
    return ok
