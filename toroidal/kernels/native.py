"""`native`: a fused C++ kernel for the CPU forward, compiled for this machine on first use.

PyTorch's fused CPU kernel has no bias input, so `decomposed` appends 4 bias features to
each platter (width 16 -> 20), which costs about 1.37x plain SDPA on its own. This kernel
computes the torus bias per score inside the flash loop instead (csrc/torus_cpu.cpp), and ran
faster than plain causal SDPA on the same tokens. It is compiled with the system C++ compiler
(`g++`, or `$CXX`) for `-march=native`, once per platter width (rounded up to a multiple of
16) and machine, into a cache folder (`$TOROIDAL_KERNEL_CACHE`, else
`~/.cache/toroidal/kernels`). Without a working compiler the backend says why and `auto`
uses `decomposed`. Set `TOROIDAL_NATIVE=0` to turn it off.

The backward pass is `decomposed`'s (it needs only the output and the log-sum-exp), so
`native` serves the calls `decomposed` serves.
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

from toroidal.kernels import decomposed
from toroidal.kernels.base import Backend, BackendUnavailable, register

_SOURCE = Path(__file__).with_name("csrc") / "torus_cpu.cpp"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-pthread", "-fno-math-errno", "-shared", "-fPIC")
_LANES = 16
_COMPILE_SECONDS = 180
_ARGTYPES = (
    [ctypes.c_void_p] * 6  # q, k, v, keep, out, lse
    + [ctypes.c_int64] * 4  # rows (B*H), length, depth, heads
    + [ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
)


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
    lib.torus_forward.argtypes = _ARGTYPES
    lib.torus_forward.restype = None
    return lib


def _padded_width(width: int) -> int:
    return -(-width // _LANES) * _LANES


def _kernel(width: int):
    lib = _library(_padded_width(width))
    if isinstance(lib, BuildError):
        raise BackendUnavailable(f"backend 'native' unavailable: {lib}")
    return lib.torus_forward


def forward_with_lse(q, k, v, geometry, key_padding, scale):
    """(output, natural log-sum-exp) of toroidal attention on platter-tokens (B, H, L, w).

    Rows with no key to attend come back as zeros with log-sum-exp -inf.
    """
    batch, heads, length, width = q.shape
    padded = _padded_width(width)
    q, k, v = (F.pad(t, (0, padded - width)) if padded != width else t for t in (q, k, v))
    q, k, v = (t.contiguous() for t in (q, k, v))
    keep = None if key_padding is None else key_padding.to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, length, dtype=torch.float32)
    _kernel(width)(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if keep is None else keep.data_ptr(),
        out.data_ptr(), lse.data_ptr(), batch * heads, length, geometry.depth, heads, geometry.period,
        float(geometry.lambda_distance), int(geometry.causal),
        -1 if geometry.window is None else geometry.window, float(scale), torch.get_num_threads(),
    )  # fmt: skip
    return out[..., :width], lse


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geometry, key_padding, scale):
        out, lse = forward_with_lse(q, k, v, geometry, key_padding, scale)
        valid = decomposed.valid_rows(geometry, key_padding, q.shape[-2])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.geometry, ctx.key_padding, ctx.scale, ctx.valid = geometry, key_padding, scale, valid
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        # Rows with nothing to attend have lse = -inf and a zero gradient; any finite lse does.
        lse = lse.masked_fill(torch.isneginf(lse), 0.0)
        geometry, padding, scale, valid = ctx.geometry, ctx.key_padding, ctx.scale, ctx.valid
        grads = decomposed.backward(q, k, v, out, lse, geometry, padding, scale, valid, grad)
        return (*grads, None, None, None)


class NativeBackend(Backend):
    name = "native"
    description = "fused C++ CPU kernel, torus bias per score (compiled on first use); decomposed's backward"

    def unavailable_reason(self, request):
        if os.environ.get("TOROIDAL_NATIVE", "1") == "0":
            return "native is turned off by TOROIDAL_NATIVE=0"
        reason = decomposed.BACKEND.unavailable_reason(request)
        if reason is not None:
            return reason.replace("decomposed", "native")
        lib = _library(_LANES)  # one width compiled tells whether this machine can build the kernel
        return str(lib) if isinstance(lib, BuildError) else None

    def forward(self, q, k, v, geometry, key_padding, scale, need_weights):
        return _NativeAttention.apply(q, k, v, geometry, key_padding, scale), None


register(NativeBackend())
