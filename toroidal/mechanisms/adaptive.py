"""Adaptive depth: a learned gate picks how many platters each (sequence, head, block) uses.

With head dim e and max depth D the platter width is w = e/D. Using d <= D platters means
the first d platters (q, k, v[..., :d*w]) attend on a torus of depth d with
`toroidal_attention(..., depth=d)`: N*d platter-tokens instead of N*D, so the attention work
scales with d^2. The platter distance is |k - l| / d on that smaller torus and the score
scale stays w^-0.5. The D - d unused output slots get the mean of the used ones ("mean",
default; output platters are all mixtures of value platters, so the mean is the same kind
of vector) or zeros ("zeros"); depth fusion over the D slots follows, as in `ToroidalKernel`.

The gate. Per query head, logits over the allowed depths min_depth..D come from a linear
map of the mean key, plus a bias. Keys, not queries: the KV cache holds them, so decoding a
token sees exactly the gate input that prefill saw. Causal calls choose one depth per block
of `block` positions, and block b reads only the keys at positions 0..b*block (its first
position): no depth choice depends on a future token, and decoding one token at a time
reproduces the full forward pass. `block=None` is one block for the whole sequence (in a
causal call that gate sees key 0 only). Bidirectional calls use one block over all keys.
The untrained gate prefers `init_depth` (default D) by GATE_MARGIN logits and has zero
weights, so a fresh kernel computes what `ToroidalKernel` computes.

Training (module in training mode and gradients enabled) computes every allowed depth over
the whole sequence and combines them per block: `soft` takes the softmax-weighted mixture;
`straight_through` outputs the argmax depth's result in the forward pass and passes the
softmax's gradient backward (one-hot + p - p.detach()). `compute_penalty` adds
penalty * (expected fraction of max-depth attention work) per call to `auxiliary_loss()`,
which the training loop adds to its loss; that term is what teaches the gate to save work.

Inference (eval mode or no gradients) takes the argmax depth, groups (sequence, head) pairs
by their choice within each run of blocks with identical choices, and runs only the chosen
platters: the unused ones are never computed.

`get_metrics()`: mean depth and the depth histogram over (query row, head) pairs, the
fraction of attention work saved by the chosen depths against always using D
(`compute_saved` = 1 - sum(pairs * d^2) / sum(pairs * D^2), pairs = query-key pairs a row
attends, causal rows counting only past keys), and `executed_vs_max`, the attention work
actually run relative to one max-depth call (above 1 in training, where every depth runs).
"""

from __future__ import annotations

import torch
from torch import nn

from toroidal.config import TORUS_OPTIONS
from toroidal.functional import toroidal_attention
from toroidal.fusion import DepthFusion
from toroidal.mechanisms.base import KernelModule, Mechanism, check_options, torus_config

GATINGS = ("straight_through", "soft")
FILLS = ("mean", "zeros")
GATE_MARGIN = 2.0  # logit lead of init_depth in the untrained gate (soft gating: most of the weight)
# Logits are GATE_GAIN x (the gate's parameters' output). Under Adam a parameter moves about lr per
# step whatever its gradient's size, so the gain makes the few gate parameters move a discrete choice
# GATE_GAIN times faster than the model's weights: a run of a few hundred steps can change depths.
GATE_GAIN = 10.0
DEFAULT_BLOCK = 64
ADAPTIVE_OPTIONS = (*TORUS_OPTIONS, "min_depth", "gating", "compute_penalty", "block", "fill", "init_depth")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"adaptive: {name}={value!r} must be an integer >= {minimum}")
    return value


class AdaptiveDepthKernel(KernelModule):
    """Toroidal attention whose depth a learned gate chooses per (sequence, head, block); see the module doc.

    Options: the torus options of `ToroidalKernel` (depth is the maximum depth D), min_depth,
    gating ('straight_through' or 'soft'), compute_penalty (>= 0), block (positions per causal
    gate decision, or None), fill ('mean' or 'zeros'), init_depth (the untrained gate's choice).
    """

    serves_sliding_window = False  # the depth gate reads the keys from position 0 on

    def __init__(self, heads: int, head_dim: int, **options):
        super().__init__()
        check_options("adaptive", options, ADAPTIVE_OPTIONS)
        self.config = torus_config(heads, head_dim, options)
        max_depth = self.config.depth
        self.min_depth = _positive_int("min_depth", options.get("min_depth", 1))
        if self.min_depth > max_depth:
            raise ValueError(f"adaptive: min_depth={self.min_depth} must be <= depth={max_depth}")
        self.gating = options.get("gating", "straight_through")
        if self.gating not in GATINGS:
            raise ValueError(f"adaptive: gating={self.gating!r} must be one of {', '.join(GATINGS)}")
        self.fill = options.get("fill", "mean")
        if self.fill not in FILLS:
            raise ValueError(f"adaptive: fill={self.fill!r} must be one of {', '.join(FILLS)}")
        penalty = options.get("compute_penalty", 0.0)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty >= 0:
            raise ValueError(f"adaptive: compute_penalty={penalty!r} must be a number >= 0")
        self.compute_penalty = float(penalty)
        block = options.get("block", DEFAULT_BLOCK)
        self.block = None if block is None else _positive_int("block", block)
        init_depth = options.get("init_depth")
        init_depth = max_depth if init_depth is None else _positive_int("init_depth", init_depth)
        if not self.min_depth <= init_depth <= max_depth:
            raise ValueError(
                f"adaptive: init_depth={init_depth} must be between min_depth={self.min_depth} and "
                f"depth={max_depth}"
            )

        self.heads, self.head_dim, self.max_depth = heads, head_dim, max_depth
        self.width = head_dim // max_depth
        self.depths = list(range(self.min_depth, max_depth + 1))
        bias = torch.zeros(heads, len(self.depths))
        bias[:, self.depths.index(init_depth)] = GATE_MARGIN / GATE_GAIN
        self.gate_weight = nn.Parameter(torch.zeros(heads, len(self.depths), head_dim))
        self.gate_bias = nn.Parameter(bias)
        self.fusion = DepthFusion(self.config.fusion, heads, max_depth, self.config.fusion_rank)
        self._penalty: torch.Tensor | None = None
        self.reset_metrics()

    def extra_repr(self) -> str:
        return (
            f"depths={self.min_depth}..{self.max_depth}, gating={self.gating}, block={self.block}, "
            f"fill={self.fill}, compute_penalty={self.compute_penalty}"
        )

    # --- blocks and the gate ------------------------------------------------------------------------

    def _blocks(self, n_q: int, q_offset: int, causal: bool) -> list[tuple[int, int, int]]:
        """(first row, end row, absolute start position of the block) of each gate decision."""
        if not causal or self.block is None:
            return [(0, n_q, 0)]
        size, blocks = self.block, []
        for index in range(q_offset // size, (q_offset + n_q - 1) // size + 1):
            start = index * size
            blocks.append((max(start - q_offset, 0), min(start + size - q_offset, n_q), start))
        return blocks

    def _gate_logits(self, k, key_padding_mask, causal, blocks) -> torch.Tensor:
        """(B, H, blocks, depths) logits from the mean real key each block may read."""
        keys = k.float()
        real = (
            torch.ones(k.shape[0], k.shape[2], device=k.device)
            if key_padding_mask is None
            else key_padding_mask.to(device=k.device, dtype=torch.float32)
        )
        sums = (keys * real[:, None, :, None]).cumsum(dim=2)  # (B, H_kv, N_k, e)
        counts = real.cumsum(dim=1)  # (B, N_k)
        # A causal block reads the keys up to its first position; a bidirectional call reads them all.
        last = [start if causal else k.shape[2] - 1 for _, _, start in blocks]
        index = torch.tensor(last, device=k.device)
        means = sums[:, :, index] / counts[:, None, index, None].clamp_min(1.0)  # (B, H_kv, blocks, e)
        means = means.repeat_interleave(self.heads // k.shape[1], dim=1)
        logits = torch.einsum("bhne,hoe->bhno", means, self.gate_weight.float()) * self.head_dim**-0.5
        return GATE_GAIN * (logits + self.gate_bias.float()[None, :, None, :])

    @staticmethod
    def _pairs(blocks, n_k: int, q_offset: int, causal: bool) -> list[int]:
        """Query-key position pairs per block (causal rows count the keys at or before them)."""
        pairs = []
        for first, end, _ in blocks:
            if causal:
                low, high = q_offset + first + 1, q_offset + end  # keys seen by the first and last row
                pairs.append((low + high) * (end - first) // 2)
            else:
                pairs.append((end - first) * n_k)
        return pairs

    # --- attention at one depth ----------------------------------------------------------------------

    def _attend(self, q, k, v, depth, *, causal, key_padding_mask, scale, q_offset, period):
        used = depth * self.width
        cfg = self.config
        out = toroidal_attention(
            q[..., :used], k[..., :used], v[..., :used], depth=depth, lambda_distance=cfg.lambda_distance,
            period=period, causal=causal, window=cfg.window, key_padding_mask=key_padding_mask, scale=scale,
            backend=cfg.backend, q_offset=q_offset,
        )  # fmt: skip
        return self._fill_unused(out, depth)

    def _fill_unused(self, out: torch.Tensor, depth: int) -> torch.Tensor:
        """(..., d*w) -> (..., e): the unused platter slots get the used platters' mean, or zeros."""
        missing = self.max_depth - depth
        if not missing:
            return out
        if self.fill == "zeros":
            return torch.cat([out, out.new_zeros(*out.shape[:-1], missing * self.width)], dim=-1)
        mean = out.unflatten(-1, (depth, self.width)).mean(dim=-2)
        return torch.cat([out, mean.repeat(*([1] * (out.dim() - 1)), missing)], dim=-1)

    # --- forward ---------------------------------------------------------------------------------------

    def forward(
        self, q, k, v, *, causal=True, key_padding_mask=None, scale=None, q_offset=0, sliding_window=None
    ):
        n_q, n_k = q.shape[-2], k.shape[-2]
        if sliding_window is not None:
            raise ValueError(
                f"adaptive: the host's sliding window ({sliding_window} keys) is in effect, but the depth "
                "gate reads the keys from position 0 on; apply adaptive to the host's full-attention layers"
            )
        if q.shape[-1] != self.head_dim or q.shape[1] != self.heads:
            raise ValueError(
                f"adaptive: kernel built for {self.heads} heads of {self.head_dim} dims, "
                f"got q {tuple(q.shape)}"
            )
        if causal and n_k < q_offset + n_q:
            raise ValueError(
                f"adaptive: a causal call needs the keys of every query position (q_offset={q_offset}, "
                f"{n_q} queries, {n_k} keys)"
            )
        blocks = self._blocks(n_q, q_offset, causal)
        logits = self._gate_logits(k, key_padding_mask, causal, blocks)
        choice = logits.argmax(dim=-1)  # (B, H, blocks): index into self.depths
        pairs = self._pairs(blocks, n_k, q_offset, causal)
        call = dict(
            causal=causal, key_padding_mask=key_padding_mask, scale=scale, q_offset=q_offset,
            period=self.config.period_for(n_k, causal),
        )  # fmt: skip
        if self.training and torch.is_grad_enabled():
            out = self._train_forward(q, k, v, logits, choice, blocks, pairs, call)
            executed = sum(pairs) * q.shape[0] * self.heads * sum(d * d for d in self.depths)
        else:
            out = self._skip_forward(q, k, v, choice, blocks, call)
            executed = None
        self._record(choice, blocks, pairs, executed)
        return self.fusion(out)

    def _train_forward(self, q, k, v, logits, choice, blocks, pairs, call):
        probs = torch.softmax(logits, dim=-1)
        if self.gating == "soft":
            weights = probs
        else:  # forward: the argmax depth; backward: the softmax's gradient
            hard = nn.functional.one_hot(choice, len(self.depths)).to(probs.dtype)
            weights = hard + probs - probs.detach()
        if self.compute_penalty > 0:
            cost = torch.tensor([(d / self.max_depth) ** 2 for d in self.depths], device=probs.device)
            share = torch.tensor(pairs, device=probs.device, dtype=torch.float32)
            expected = ((probs * cost).sum(dim=-1) * (share / share.sum())).sum(dim=-1).mean()
            term = self.compute_penalty * expected
            self._penalty = term if self._penalty is None else self._penalty + term
        lengths = torch.tensor([end - first for first, end, _ in blocks], device=q.device)
        row_weights = weights.repeat_interleave(lengths, dim=2).to(q.dtype)  # (B, H, N_q, depths)
        out = None
        for option, depth in enumerate(self.depths):
            part = row_weights[..., option : option + 1] * self._attend(q, k, v, depth, **call)
            out = part if out is None else out + part
        return out

    def _skip_forward(self, q, k, v, choice, blocks, call):
        """Only the chosen platters: per run of blocks with equal choices, one call per chosen depth."""
        b, h, n_q, e = q.shape
        flat_choice = choice.reshape(b * h, -1).cpu()
        runs: list[list] = []  # [first row, end row, choice per (sequence, head)]
        for index, (first, end, _) in enumerate(blocks):
            column = flat_choice[:, index]
            if runs and torch.equal(runs[-1][2], column):
                runs[-1][1] = end
            else:
                runs.append([first, end, column])
        out = q.new_empty(b * h, n_q, e)
        k_flat = v_flat = None
        for first, end, column in runs:
            n_keys = call["q_offset"] + end if call["causal"] else k.shape[2]
            run_call = {**call, "q_offset": call["q_offset"] + first}
            for option in column.unique().tolist():
                depth = self.depths[option]
                rows = slice(first, end)
                if bool((column == option).all()):  # every (sequence, head): no gathering
                    mask = None if call["key_padding_mask"] is None else call["key_padding_mask"][:, :n_keys]
                    part = self._attend(
                        q[:, :, rows], k[:, :, :n_keys], v[:, :, :n_keys], depth,
                        **{**run_call, "key_padding_mask": mask},
                    )  # fmt: skip
                    out.view(b, h, n_q, e)[:, :, rows] = part
                    continue
                if k_flat is None:  # per query head, so that any (sequence, head) subset can be taken
                    k_flat, v_flat = (
                        t.repeat_interleave(h // t.shape[1], dim=1).reshape(b * h, -1, e) for t in (k, v)
                    )
                picked = (column == option).nonzero().squeeze(1).to(q.device)
                mask = call["key_padding_mask"]
                if mask is not None:
                    mask = mask[picked // h, :n_keys]
                part = self._attend(
                    q.reshape(b * h, n_q, e)[picked, rows].unsqueeze(1),
                    k_flat[picked, :n_keys].unsqueeze(1),
                    v_flat[picked, :n_keys].unsqueeze(1),
                    depth,
                    **{**run_call, "key_padding_mask": mask},
                )
                out[picked, rows] = part.squeeze(1)
        return out.view(b, h, n_q, e)

    # --- metrics and the compute penalty ------------------------------------------------------------

    def _record(self, choice, blocks, pairs, executed) -> None:
        depth_of = torch.tensor(self.depths, device=choice.device)[choice]  # (B, H, blocks)
        lengths = torch.tensor([end - first for first, end, _ in blocks], device=choice.device)
        share = torch.tensor(pairs, device=choice.device, dtype=torch.float64)
        counts = torch.stack([((choice == option) * lengths).sum() for option in range(len(self.depths))])
        used = (depth_of.double() ** 2 * share).sum()
        full = share.sum() * choice.shape[0] * choice.shape[1] * self.max_depth**2
        counts, used, full = counts.tolist(), float(used), float(full)
        self._calls += 1
        for option, count in enumerate(counts):
            self._rows[option] += count
        self._used += used
        self._full += full
        self._executed += used if executed is None else float(executed)

    def get_metrics(self) -> dict:
        total = sum(self._rows)
        if not self._calls or not total:
            return {}
        return {
            "calls": self._calls,
            "min_depth": self.min_depth,
            "max_depth": self.max_depth,
            "mean_depth": sum(d * n for d, n in zip(self.depths, self._rows, strict=True)) / total,
            "depth_histogram": {str(d): n / total for d, n in zip(self.depths, self._rows, strict=True)},
            "compute_saved": 1.0 - self._used / self._full if self._full else 0.0,
            "executed_vs_max": self._executed / self._full if self._full else 0.0,
        }

    def reset_metrics(self) -> None:
        self._calls, self._rows = 0, [0] * len(self.depths)
        self._used = self._full = self._executed = 0.0

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The compute penalty accumulated by training calls since the last call (None: nothing)."""
        penalty, self._penalty = self._penalty, None
        return penalty


def adaptive_run(mechanism: str | None, options: dict, min_depth: int | None) -> tuple[str, dict]:
    """(mechanism, options) of a training run asked for with adaptive depth: `adaptive`, with
    `min_depth` (None: the mechanism's default) among its options. ValueError on a contradiction."""
    if mechanism not in (None, "adaptive"):
        raise ValueError(f"adaptive depth runs the 'adaptive' mechanism, not {mechanism!r}")
    options = dict(options)
    if min_depth is not None:
        given = options.get("min_depth", min_depth)
        if given != min_depth:
            raise ValueError(f"min_depth {min_depth} disagrees with the option min_depth={given}")
        options["min_depth"] = min_depth
    return "adaptive", options


def adaptive_kernels(model: nn.Module) -> list[AdaptiveDepthKernel]:
    """Every adaptive-depth kernel inside `model`."""
    return [module for module in model.modules() if isinstance(module, AdaptiveDepthKernel)]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the compute penalties of every adaptive kernel in `model` since the last call (and reset)."""
    terms = [term for kernel in adaptive_kernels(model) if (term := kernel.auxiliary_loss()) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def adaptive_metrics(model: nn.Module) -> dict:
    """Mean depth and compute saved over every adaptive kernel in `model` since their last reset.

    The mean depth is weighted by (query row, head) pairs, the compute saved by attention work.
    """
    kernels = [kernel for kernel in adaptive_kernels(model) if kernel._calls]
    rows = sum(sum(kernel._rows) for kernel in kernels)
    full = sum(kernel._full for kernel in kernels)
    if not rows or not full:
        return {}
    depth_rows = sum(d * n for kernel in kernels for d, n in zip(kernel.depths, kernel._rows, strict=True))
    return {
        "mean_depth": depth_rows / rows,
        "compute_saved": 1.0 - sum(kernel._used for kernel in kernels) / full,
    }


def reset_adaptive_metrics(model: nn.Module) -> None:
    for kernel in adaptive_kernels(model):
        kernel.reset_metrics()


MECHANISM = Mechanism(
    "adaptive",
    "toroidal attention whose depth a learned gate picks per sequence, head and block",
    AdaptiveDepthKernel,
    accepts=ADAPTIVE_OPTIONS,
    approximates="toroidal",
)
