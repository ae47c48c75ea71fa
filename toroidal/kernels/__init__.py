"""Backends: one file each, one signature (see `base`), a registry and `auto` selection."""

from toroidal.kernels import blockwise, decomposed, flash2, flex, native, reference, sdpa  # noqa: F401  (registration)
from toroidal.kernels.base import (
    Backend,
    BackendUnavailable,
    KernelRequest,
    backend_names,
    get_backend,
    register,
)
from toroidal.kernels.select import resolve_backend, valid_backends

__all__ = [
    "Backend",
    "BackendUnavailable",
    "KernelRequest",
    "backend_names",
    "get_backend",
    "register",
    "resolve_backend",
    "valid_backends",
]
