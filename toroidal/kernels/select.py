"""Choosing a backend: explicit names are checked, `auto` takes the first valid one in preference order."""

from __future__ import annotations

from toroidal.kernels.base import Backend, BackendUnavailable, KernelRequest, backend_names, get_backend

# Fastest first, per device type. Platter-token count thresholds come from `toroidal bench`.
_PREFERENCE = {
    "cuda": ("flash2", "flex", "sdpa", "blockwise", "reference"),
    "cpu": ("sdpa", "blockwise", "reference"),
}
# Above this many query*key platter-token pairs per (batch, head), a materialized
# bias costs more memory than it saves time: prefer the tiled kernel.
_MATERIALIZE_LIMIT = 8192 * 8192


def valid_backends(request: KernelRequest) -> dict[str, str | None]:
    """Every registered backend mapped to None (usable) or the reason it is not."""
    return {name: get_backend(name).unavailable_reason(request) for name in backend_names()}


def _auto_order(request: KernelRequest) -> list[str]:
    order = list(_PREFERENCE.get(request.device_type, ("sdpa", "blockwise", "reference")))
    pairs = request.n_queries * request.n_keys * request.geometry.depth**2
    if pairs > _MATERIALIZE_LIMIT and "blockwise" in order:
        order.remove("blockwise")
        order.insert(0 if request.device_type == "cpu" else order.index("sdpa"), "blockwise")
    return [name for name in order if name in backend_names()]


def resolve_backend(name: str, request: KernelRequest) -> Backend:
    """The backend named `name` (or chosen by `auto`), checked against `request`."""
    if name == "auto":
        for candidate in _auto_order(request):
            backend = get_backend(candidate)
            if backend.unavailable_reason(request) is None:
                return backend
        raise BackendUnavailable("no registered backend can serve this call")
    backend = get_backend(name)
    reason = backend.unavailable_reason(request)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} unavailable: {reason}")
    return backend
