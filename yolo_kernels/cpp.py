"""The compiled extension's own services, shared by every family's ``cpp`` backend: its build
information and its gradient pool.

The gradient buffers come from the extension's pool (see ``pool_stats``): when autograd frees them
their memory goes back to the pool, so the next step reuses memory that is already paged in.
"""

from __future__ import annotations

from .library import BUILD_HINT, require_extension

__all__ = [
    "BUILD_HINT",
    "build_info",
    "pool_stats",
    "pool_clear",
    "pool_set_limit",
    "pool_set_enabled",
]


def build_info() -> dict:
    """Compiler, flags and parallel backend of the compiled extension."""
    return require_extension().build_info()


def pool_stats() -> dict:
    """The CPU gradient pool: ``enabled``, ``cached_bytes``, ``cached_buffers``, ``limit_bytes``, ``hits``,
    ``misses``."""
    return require_extension().pool_stats()


def pool_clear() -> None:
    """Free every buffer the gradient pool holds."""
    require_extension().pool_clear()


def pool_set_limit(nbytes: int) -> None:
    """The most bytes the pool keeps (default 4 GiB, or ``YOLO_KERNELS_GRAD_POOL_MB``)."""
    require_extension().pool_set_limit(int(nbytes))


def pool_set_enabled(enabled: bool) -> None:
    """Turn the pool off (fresh allocations every call) or on."""
    require_extension().pool_set_enabled(bool(enabled))
