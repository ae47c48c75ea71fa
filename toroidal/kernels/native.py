"""`native`: fused C++ CPU kernels (forward and backward, csrc/torus_cpu.cpp), compiled for this
machine on first use into `$TOROIDAL_KERNEL_CACHE` (default ~/.cache/toroidal/kernels).
`TOROIDAL_NATIVE=0` turns it off.
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

from toroidal.kernels.base import Backend, BackendUnavailable, register

_SOURCE = Path(__file__).with_name("csrc") / "torus_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-pthread", "-fno-math-errno", "-shared", "-fPIC")
_LANES = 16
_KEY_BLOCK = 256  # KB in the source: keys per block of the backward's tasks
_COMPILE_SECONDS = 180
_GEOMETRY_ARGS = (
    [ctypes.c_int64] * 6  # rows (B*H), query length, key length, depth, heads, query offset
    + [ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
)  # period, lambda, causal, window (-1: none), scale, threads
_FORWARD_ARGS = [ctypes.c_void_p] * 6 + _GEOMETRY_ARGS  # q, k, v, keep, out, lse
_BACKWARD_ARGS = [ctypes.c_void_p] * 10 + [ctypes.c_int64] + _GEOMETRY_ARGS
# q, k, v, keep, grad, lse, delta, dq parts, dk, dv; dq parts per head
# Positions are exact in float32 up to 2**24.
_MAX_POSITIONS = 2**24


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


def _build(width: int) -> Path:
    """The shared library for `width`, compiled into the cache unless already there."""
    compiler = _compiler()
    if compiler is None:
        raise BuildError("native needs a C++ compiler (g++ or $CXX) to build its kernel; none was found")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(
        b"|".join([source, str(width).encode(), " ".join(_FLAGS).encode(), _machine_key(compiler).encode()])
    ).hexdigest()[:20]
    target = cache_dir() / f"torus_cpu_w{width}_{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent build or a crash never leaves half a file.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    command = [compiler, *_FLAGS, f"-DWIDTH={width}", "-o", partial, str(_SOURCE)]
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
def _library(width: int):
    """The loaded kernel for a padded width, or the BuildError that says why there is none."""
    try:
        lib = ctypes.CDLL(str(_build(width)))
    except OSError as exc:
        return BuildError(f"loading the native kernel failed: {exc}")
    except BuildError as exc:
        return exc
    lib.torus_forward.argtypes, lib.torus_forward.restype = _FORWARD_ARGS, None
    lib.torus_backward.argtypes, lib.torus_backward.restype = _BACKWARD_ARGS, None
    return lib


def _padded_width(width: int) -> int:
    return -(-width // _LANES) * _LANES


def _library_for(width: int):
    lib = _library(_padded_width(width))
    if isinstance(lib, BuildError):
        raise BackendUnavailable(f"backend 'native' unavailable: {lib}")
    return lib


def _padded(tensors, width):
    padded = _padded_width(width)
    return [(F.pad(t, (0, padded - width)) if padded != width else t).contiguous() for t in tensors]


def _geometry_args(q, k, geometry, scale):
    batch, heads, lq, _ = q.shape
    return (
        batch * heads, lq, k.shape[-2], geometry.depth, heads, geometry.q_offset, geometry.period,
        float(geometry.lambda_distance), int(geometry.causal),
        -1 if geometry.window is None else geometry.window, float(scale), torch.get_num_threads(),
    )  # fmt: skip


def _keep(key_padding):
    return None if key_padding is None else key_padding.to(torch.uint8).contiguous()


def _pointer(t):
    return 0 if t is None else t.data_ptr()


def forward_with_lse(q, k, v, geometry, key_padding, scale):
    """(output, natural log-sum-exp) of toroidal attention on platter-tokens q (B, H, Lq, w), k and v
    (B, H, Lk, w).

    Rows with no key to attend come back as zeros with log-sum-exp -inf.
    """
    batch, heads, lq, width = q.shape
    q, k, v = _padded((q, k, v), width)
    keep = _keep(key_padding)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, lq, dtype=torch.float32)
    _library_for(width).torus_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(keep), out.data_ptr(), lse.data_ptr(),
        *_geometry_args(q, k, geometry, scale),
    )  # fmt: skip
    return out[..., :width], lse


def _dq_parts(rows: int, key_blocks: int) -> int:
    """Key-block shares per (batch, head): enough tasks for every thread, each share with its own dq."""
    threads = torch.get_num_threads()
    return max(1, min(key_blocks, -(-2 * threads // rows))) if threads > 1 else 1


def backward(q, k, v, out, lse, grad, geometry, key_padding, scale):
    """Gradients (q, k, v) from the forward's output and log-sum-exp (flash attention's backward)."""
    batch, heads, lq, width = q.shape
    delta = (grad.float() * out).sum(-1).contiguous()  # rowsum(dO * O): the softmax's Jacobian term
    q, k, v, grad = _padded((q, k, v, grad), width)
    keep = _keep(key_padding)
    parts = _dq_parts(batch * heads, -(-k.shape[-2] // _KEY_BLOCK))
    dq = torch.zeros(batch, heads, parts, lq, q.shape[-1])
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _library_for(width).torus_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _pointer(keep), grad.data_ptr(),
        lse.contiguous().data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), parts,
        *_geometry_args(q, k, geometry, scale),
    )  # fmt: skip
    dq = dq[:, :, 0] if parts == 1 else dq.sum(dim=2)
    return dq[..., :width], dk[..., :width], dv[..., :width]


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geometry, key_padding, scale):
        out, lse = forward_with_lse(q, k, v, geometry, key_padding, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry, ctx.key_padding, ctx.scale = geometry, key_padding, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        grads = backward(q, k, v, out, lse, grad, ctx.geometry, ctx.key_padding, ctx.scale)
        return (*grads, None, None, None)


class NativeBackend(Backend):
    name = "native"
    description = "fused C++ CPU kernels, torus bias per score (compiled on first use)"

    def unavailable_reason(self, request):
        if os.environ.get("TOROIDAL_NATIVE", "1") == "0":
            return "native is turned off by TOROIDAL_NATIVE=0"
        if request.device_type != "cpu":
            return "native runs on CPU only (its kernel is compiled C++)"
        if request.dtype != torch.float32:
            return "native needs float32"
        if request.need_weights:
            return "native does not materialize weights; use backend='reference'"
        reach = request.geometry.q_offset + max(request.n_queries, request.n_keys)
        if reach > _MAX_POSITIONS:
            return f"native needs positions below 2**24 (float32 exact), this call reaches {reach}"
        lib = _library(_LANES)  # one width compiled tells whether this machine can build the kernel
        return str(lib) if isinstance(lib, BuildError) else None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        return _NativeAttention.apply(q, k, v, geometry, key_padding, scale), None


register(NativeBackend())
