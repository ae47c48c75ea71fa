"""`native`: fused C++ CPU kernels (forward and backward, csrc/torus_cpu.cpp), compiled for this
machine on first use into `$TOROIDAL_KERNEL_CACHE` (default ~/.cache/toroidal/kernels), one
library per padded width and precision (float32, or float64 computed in float64).
`TOROIDAL_NATIVE=0` turns it off.

The kernels are registered operators, `torch.ops.toroidal.native_forward` and `native_backward`,
with fake (shape-only) implementations and registered autograd: torch.compile traces them
without a graph break, while the C++ library stays a plain ctypes build.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from toroidal.kernels.base import Backend, BackendUnavailable, register, register_lse_autograd

_SOURCE = Path(__file__).with_name("csrc") / "torus_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-pthread", "-fno-math-errno", "-shared", "-fPIC")
_LANES = 16
_KEY_BLOCK = 256  # KB in the source: keys per block of the backward's tasks
_COMPILE_SECONDS = 180
# The C++ `scalar` of each build: its ctypes type and the flag that selects it.
_PRECISIONS = {torch.float32: (ctypes.c_float, ()), torch.float64: (ctypes.c_double, ("-DTOROIDAL_DOUBLE",))}
# Positions are exact up to 2**24 in float32 (2**53 in float64).
_MAX_POSITIONS = {torch.float32: 2**24, torch.float64: 2**53}


def _argtypes(scalar) -> tuple[list, list]:
    geometry = (
        [ctypes.c_int64] * 6  # rows (B*H), query length, key length, depth, heads, query offset
        + [ctypes.c_int64, scalar, ctypes.c_int, ctypes.c_int64, scalar, ctypes.c_int]
    )  # period, lambda, causal, window (-1: none), scale, threads
    forward = [ctypes.c_void_p] * 6 + geometry  # q, k, v, keep, out, lse
    backward = [ctypes.c_void_p] * 10 + [ctypes.c_int64] + geometry
    # q, k, v, keep, grad, lse, delta, dq parts, dk, dv; dq parts per head
    return forward, backward


class BuildError(RuntimeError):
    """The kernel could not be compiled or loaded here (the message says why, in one line)."""


def cache_dir() -> Path:
    explicit = os.environ.get("TOROIDAL_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "toroidal" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _machine_key(compiler: str) -> str:
    """What the binary depends on besides the source: compiler version and this CPU's features."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"cannot run the C++ compiler {compiler!r}: {exc}") from exc
    cpu = ""
    with contextlib.suppress(OSError):  # not Linux: the machine name and compiler still separate builds
        cpu = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
        )
    return f"{version}|{platform.machine()}|{platform.processor()}|{cpu}"


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0][:300]


def _build(width: int, dtype: torch.dtype = torch.float32) -> Path:
    """The shared library for `width` and `dtype`, compiled into the cache unless already there."""
    compiler = _compiler()
    if compiler is None:
        raise BuildError("native needs a C++ compiler (g++ or $CXX) to build its kernel; none was found")
    source = _SOURCE.read_bytes()
    flags = (*_FLAGS, *_PRECISIONS[dtype][1])
    digest = hashlib.sha256(
        b"|".join([source, str(width).encode(), " ".join(flags).encode(), _machine_key(compiler).encode()])
    ).hexdigest()[:20]
    suffix = "_f64" if dtype == torch.float64 else ""
    target = cache_dir() / f"torus_cpu_w{width}{suffix}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent build or a crash never leaves half a file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *flags, f"-DWIDTH={width}", "-o", partial, str(_SOURCE)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_SECONDS)
        if result.returncode != 0:
            reason = _first_error(result.stderr + result.stdout)
            raise BuildError(f"compiling the native kernel failed: {reason}")
        os.replace(partial, target)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"compiling the native kernel took over {_COMPILE_SECONDS} s") from exc
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def _library(width: int, dtype: torch.dtype = torch.float32):
    """The loaded kernel for a padded width and dtype, or the BuildError that says why there is none."""
    try:
        lib = ctypes.CDLL(str(_build(width, dtype)))
    except OSError as exc:
        return BuildError(f"loading the native kernel failed: {exc}")
    except BuildError as exc:
        return exc
    forward, backward = _argtypes(_PRECISIONS[dtype][0])
    lib.torus_forward.argtypes, lib.torus_forward.restype = forward, None
    lib.torus_backward.argtypes, lib.torus_backward.restype = backward, None
    return lib


def _padded_width(width: int) -> int:
    return -(-width // _LANES) * _LANES


def _library_for(width: int, dtype: torch.dtype):
    lib = _library(_padded_width(width), dtype)
    if isinstance(lib, BuildError):
        raise BackendUnavailable(f"backend 'native' unavailable: {lib}")
    return lib


def _padded(tensors, width):
    padded = _padded_width(width)
    return [(F.pad(t, (0, padded - width)) if padded != width else t).contiguous() for t in tensors]


def _call_args(q, k, depth, period, lambda_distance, causal, window, q_offset, scale):
    batch, heads, lq, _ = q.shape
    return (
        batch * heads, lq, k.shape[-2], depth, heads, q_offset, period, float(lambda_distance), int(causal),
        -1 if window is None else window, float(scale), torch.get_num_threads(),
    )  # fmt: skip


def _check_dtypes(*tensors) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or tensors[0].dtype not in _PRECISIONS:
        raise TypeError(f"the native kernel takes float32 or float64 tensors of one dtype, got {dtypes}")


def _keep(key_padding):
    return None if key_padding is None else key_padding.to(torch.uint8).contiguous()


def _pointer(t):
    return 0 if t is None else t.data_ptr()


# The kernels are registered operators (`torch.ops.toroidal.native_forward` / `native_backward`):
# torch.compile traces them from their fake (shape-only) implementations and autograd finds the
# backward by registration, while the C++ library stays a plain ctypes build. The geometry travels
# as plain arguments; `keep` is the (B, Lk) key padding mask (True: a real key) or None.


@torch.library.custom_op("toroidal::native_forward", mutates_args=(), device_types="cpu")
def native_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, depth: int, period: int,
    lambda_distance: float, causal: bool, window: int | None, q_offset: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(output, natural log-sum-exp) of toroidal attention on platter-tokens q (B, H, Lq, w), k and v
    (B, H, Lk, w). Rows with no key to attend come back as zeros with log-sum-exp -inf."""
    _check_dtypes(q, k, v)
    batch, heads, lq, width = q.shape
    q, k, v = _padded((q, k, v), width)
    keep_bytes = _keep(keep)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, lq, dtype=q.dtype)
    _library_for(width, q.dtype).torus_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(keep_bytes), out.data_ptr(), lse.data_ptr(),
        *_call_args(q, k, depth, period, lambda_distance, causal, window, q_offset, scale),
    )  # fmt: skip
    return out[..., :width], lse


@native_forward.register_fake
def _native_forward_fake(q, k, v, keep, depth, period, lambda_distance, causal, window, q_offset, scale):
    *lead, width = q.shape
    # The same strides as the real kernel: a slice of its lane-padded output.
    out = q.new_empty(*lead, _padded_width(width))[..., :width]
    return out, q.new_empty(lead)


@torch.library.custom_op("toroidal::native_backward", mutates_args=(), device_types="cpu")
def native_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor,
    lse: torch.Tensor, grad: torch.Tensor, depth: int, period: int, lambda_distance: float, causal: bool,
    window: int | None, q_offset: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients (q, k, v) from the forward's output and log-sum-exp (flash attention's backward)."""
    _check_dtypes(q, k, v, out, lse)
    batch, heads, lq, width = q.shape
    delta = (grad.to(q.dtype) * out).sum(-1).contiguous()  # rowsum(dO * O): the softmax's Jacobian term
    q, k, v, grad = _padded((q, k, v, grad), width)
    keep_bytes = _keep(keep)
    parts = _dq_parts(batch * heads, -(-k.shape[-2] // _KEY_BLOCK))
    dq = torch.zeros(batch, heads, parts, lq, q.shape[-1], dtype=q.dtype)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _library_for(width, q.dtype).torus_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(keep_bytes), grad.data_ptr(),
        lse.contiguous().data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), parts,
        *_call_args(q, k, depth, period, lambda_distance, causal, window, q_offset, scale),
    )  # fmt: skip
    dq = dq[:, :, 0] if parts == 1 else dq.sum(dim=2)
    return dq[..., :width].contiguous(), dk[..., :width].contiguous(), dv[..., :width].contiguous()


@native_backward.register_fake
def _native_backward_fake(q, k, v, keep, out, lse, grad, *geometry):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


# The overloads themselves: calling them skips the Python wrapper's checks (~20 us a call).
_FORWARD_OP = torch.ops.toroidal.native_forward.default
_BACKWARD_OP = torch.ops.toroidal.native_backward.default
register_lse_autograd(native_forward, _BACKWARD_OP)


def _dq_parts(rows: int, key_blocks: int) -> int:
    """Key-block shares per (batch, head): enough tasks for every thread, each share with its own dq."""
    threads = torch.get_num_threads()
    return max(1, min(key_blocks, -(-2 * threads // rows))) if threads > 1 else 1


def geometry_args(geometry) -> tuple:
    """A `TorusGeometry` as the operators' arguments (depth ... q_offset), before the scale."""
    g = geometry
    return (g.depth, g.period, float(g.lambda_distance), g.causal, g.window, g.q_offset)


def forward_with_lse(q, k, v, geometry, key_padding, scale):
    """`native_forward` for a `TorusGeometry`: (output, natural log-sum-exp)."""
    return _FORWARD_OP(q, k, v, key_padding, *geometry_args(geometry), float(scale))


class NativeBackend(Backend):
    name = "native"
    description = "fused C++ CPU kernels, torus bias per score (compiled on first use)"

    def unavailable_reason(self, request):
        if os.environ.get("TOROIDAL_NATIVE", "1") == "0":
            return "native is turned off by TOROIDAL_NATIVE=0"
        if request.device_type != "cpu":
            return "native runs on CPU only (its kernel is compiled C++)"
        if request.dtype not in _PRECISIONS:
            return "native needs float32 or float64"
        if request.need_weights:
            return "native does not materialize weights; use backend='reference'"
        if request.geometry.sliding_window is not None:
            return "native does not take a host sliding window; use sdpa or blockwise"
        reach = request.geometry.q_offset + max(request.n_queries, request.n_keys)
        limit = _MAX_POSITIONS[request.dtype]
        if reach > limit:
            below = f"2**{limit.bit_length() - 1} ({str(request.dtype).removeprefix('torch.')} exact)"
            return f"native needs positions below {below}, this call reaches {reach}"
        # One width compiled tells whether this machine can build the kernel.
        lib = _library(_LANES, request.dtype)
        return str(lib) if isinstance(lib, BuildError) else None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        return forward_with_lse(q, k, v, geometry, key_padding, scale)[0], None


register(NativeBackend())
