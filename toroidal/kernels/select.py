"""Choosing a backend: explicit names are checked; `auto` takes a tuning table's measured choice
(`toroidal.kernels.tuning_table`) where one covers the call, else the first valid one in preference order.

Under `torch.compile` the choice is made while tracing, by the same code as in eager mode, and
enters the graph as a constant (no graph break): the sizes it depends on are made static there
(one graph per sequence length), and a tuning table or environment changed after compiling is
not seen by that graph.
"""

from __future__ import annotations

import operator

import torch

from toroidal.geometry import TorusGeometry
from toroidal.kernels import tuning_table
from toroidal.kernels.base import Backend, BackendUnavailable, KernelRequest, backend_names, get_backend

# Fastest first, per device type, for large calls; see `_auto_order` for size rules.
_PREFERENCE = {
    "cuda": ("flash2", "flex", "sdpa", "blockwise", "reference"),
    "cpu": ("native", "decomposed", "sdpa", "blockwise", "reference"),
}
# Thresholds in query x key platter-token pairs per (batch, head), measured with `toroidal bench`
# (B=1, H=8, w=16, causal, D=4, 2-core CPU). `native` beat every other CPU backend from N=64 up
# in the forward (N=64: 0.64 ms vs sdpa 0.78; N=256: 3.4 vs 6.9), and in training from N=128
# (5.4 ms vs 7.4; N=96: 3.4 vs 3.4; N=64: 2.3 vs 2.0), so up to SMALL_TRAINING sdpa trains.
# Up to SMALL, sdpa also beats the decomposed pieces' fixed costs (N=256: 17 ms vs 32 ms;
# N=1024: 272 ms vs 200 ms), which matters where native cannot be built.
# Above MATERIALIZE, a materialized (L x L) bias costs more memory than a tiled kernel.
_SMALL = 2048 * 2048
_SMALL_TRAINING = 384 * 384
_MATERIALIZE_LIMIT = 8192 * 8192


def valid_backends(request: KernelRequest) -> dict[str, str | None]:
    """Every registered backend mapped to None (usable) or the reason it is not."""
    return {name: get_backend(name).unavailable_reason(request) for name in backend_names()}


def _move(order: list[str], name: str, before: str) -> None:
    if name in order and before in order:
        order.remove(name)
        order.insert(order.index(before), name)


def _auto_order(request: KernelRequest) -> list[str]:
    order = list(_PREFERENCE.get(request.device_type, ("sdpa", "blockwise", "reference")))
    pairs = request.n_queries * request.n_keys * request.geometry.depth**2
    if pairs <= _SMALL:
        small_training = request.requires_grad and pairs <= _SMALL_TRAINING
        native_wins = request.device_type == "cpu" and not small_training
        _move(order, "sdpa", before="decomposed" if native_wins else order[0])
    elif pairs > _MATERIALIZE_LIMIT:
        _move(order, "blockwise", before="sdpa")
    return [name for name in order if name in backend_names()]


_decisions: dict[KernelRequest, Backend] = {}
_MAX_DECISIONS = 4096  # decoding asks with a new key length every token: start over past this
_decided_with: tuple = ()  # (tuning table generation, registered backends) the decisions were made with


def _choose(request: KernelRequest) -> Backend:
    tuned = tuning_table.tuned_backend(request)  # `toroidal bench --tune` measured it, where a table says
    if tuned is not None:
        return tuned
    for candidate in _auto_order(request):
        backend = get_backend(candidate)
        if backend.unavailable_reason(request) is None:
            return backend
    raise BackendUnavailable("no registered backend can serve this call")


def forget_decisions() -> None:
    """Make `auto` decide again (after registering a backend, or for a test)."""
    _decisions.clear()


def resolve_backend(name: str, request: KernelRequest) -> Backend:
    """The backend named `name` (or chosen by `auto`), checked against `request`."""
    if torch.compiler.is_compiling():
        chosen, tile, refusal = _decided_while_tracing(name, *_static_fields(request))
        if refusal is not None:
            raise BackendUnavailable(refusal)
        backend = get_backend(chosen)
        return backend if tile is None else backend.with_tile(tile)
    return _resolve(name, request)


def _static_fields(request: KernelRequest) -> tuple:
    """The request as Python constants; `operator.index` specializes symbolic sizes to their values."""
    g = request.geometry
    window = None if g.window is None else operator.index(g.window)
    sliding = None if g.sliding_window is None else operator.index(g.sliding_window)
    return (
        request.device_type, request.dtype, request.requires_grad, request.need_weights,
        operator.index(request.n_queries), operator.index(request.n_keys), request.has_padding,
        g.depth, operator.index(g.period), float(g.lambda_distance), g.causal, window,
        operator.index(g.q_offset), sliding,
    )  # fmt: skip


def _decided_while_tracing(
    name, device_type, dtype, requires_grad, need_weights, n_queries, n_keys, has_padding,
    depth, period, lambda_distance, causal, window, q_offset, sliding_window,
) -> tuple[str, int | None, str | None]:  # fmt: skip
    """`_resolve`, run by torch.compile's tracer on real values. Its answer enters the graph as a
    constant: the registered backend's name, the tile where a tuning table changed it, and the
    BackendUnavailable message where the call cannot be served (raised by the traced code)."""
    geometry = TorusGeometry(depth, period, lambda_distance, causal, window, q_offset, sliding_window)
    request = KernelRequest(
        device_type, dtype, requires_grad, need_weights, geometry, n_queries, n_keys, has_padding
    )
    try:
        backend = _resolve(name, request)
    except BackendUnavailable as refusal:
        return "", None, str(refusal)
    registered = get_backend(backend.name)
    tile = getattr(backend, "tile", None)
    changed = backend is not registered and tile != getattr(registered, "tile", None)
    return backend.name, (tile if changed else None), None


# What `torch.compiler.assume_constant_result` does, without its import of torch._dynamo: that
# import costs ~1.1 s of every start-up, and eager runs never trace. (test_compile checks it holds.)
_decided_while_tracing._dynamo_marked_constant = True


def _resolve(name: str, request: KernelRequest) -> Backend:
    if name == "auto":
        global _decided_with
        state = (tuning_table.generation(), *backend_names())
        if state != _decided_with:  # a new table or backend: decide again
            _decisions.clear()
            _decided_with = state
        backend = _decisions.get(request)
        if backend is None:
            if len(_decisions) >= _MAX_DECISIONS:
                _decisions.clear()
            backend = _decisions[request] = _choose(request)
        return backend
    backend = get_backend(name)
    reason = backend.unavailable_reason(request)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} unavailable: {reason}")
    return backend
