"""Language-model metrics: loss, perplexity, bits per token and per byte, passkey accuracy, speed, memory.

Bits per byte = total negative log-likelihood / ln 2 / bytes, where bytes = predicted tokens
x the dataset's average UTF-8 bytes per token (exact for byte tokenizers); it is None for
synthetic token data that is not text.

Passkey accuracy: the fraction of samples whose answer tokens are all the argmax of the
model given the preceding tokens, which is exactly whether greedy decoding after the
question reproduces the pass key.

A `TokenFingerprint` hashes the token ids of the samples scored, in order, so two results can
tell whether they scored the same text whatever their batch sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toroidal.runtime.devices import DTYPES
from toroidal.runtime.timing import synchronize
from toroidal.training.distributed import DistInfo, all_reduce_sum

DEFAULT_SYNTHETIC_BATCHES = 16  # unbounded (synthetic) data needs a limit


@dataclass(frozen=True)
class Precision:
    """Autocast for mixed precision on CUDA; fp32 is plain."""

    name: str = "fp32"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32, no autocast)."""
        return None if self.name == "fp32" else DTYPES.get(self.name)

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def token_losses(model, ids: torch.Tensor, precision: Precision, device: torch.device):
    """((B, seq_len) float32 cross-entropy of each next token, the logits) for ids (B, seq_len + 1)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with precision.autocast(device):
        logits = model(input_ids=inputs, use_cache=False).logits
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view_as(targets), logits


class TokenFingerprint:
    """sha256 of the int64 (little-endian) token ids of the scored samples, in order: each sample's
    seq_len + 1 ids, so the same samples give the same fingerprint at any batch size."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, ids: torch.Tensor) -> None:
        self._hash.update(ids.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes())

    def hexdigest(self, length: int = 16) -> str:
        return self._hash.hexdigest()[:length]


def sample_count(dataset, batch_size: int, max_batches: int | None, max_samples: int | None = None) -> int:
    """The samples scored: the first `max_samples`, else `max_batches` batches, else all of a finite
    set (DEFAULT_SYNTHETIC_BATCHES batches of an unbounded one); never more than a finite set holds."""
    if max_samples is not None and max_batches is not None:
        raise ValueError("give max_samples or max_batches, not both")
    if max_samples is not None:
        wanted = max_samples
    elif max_batches is not None or dataset.size is None:
        wanted = batch_size * (max_batches or DEFAULT_SYNTHETIC_BATCHES)
    else:
        wanted = dataset.size
    return wanted if dataset.size is None else min(dataset.size, wanted)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory: CUDA allocator peak on GPU, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"


@torch.no_grad()
def evaluate_lm(
    model,
    dataset,
    *,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    precision: Precision = Precision(),
    dist: DistInfo = DistInfo(),
    progress=None,
    max_samples: int | None = None,
    fingerprint: TokenFingerprint | None = None,
) -> dict:
    """Metrics of `model` on the first samples of `dataset` (all of a finite one by default).

    `max_batches` counts global batches (batch_size x processes): ranks take those samples
    round-robin and sum their totals, so 2 processes x batch 2 measure what 1 x 4 measures.
    `max_samples` instead (not both) scores the first `max_samples` samples at any batch size.
    `fingerprint` (one process only) is updated with each batch's token ids, in order.
    `progress(done, total)` is called after each batch.
    """
    if fingerprint is not None and dist.world > 1:
        raise ValueError("a token fingerprint needs the samples in order: one process")
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = sample_count(dataset, batch_size * dist.world, max_batches, max_samples)  # global batches
    mine = list(range(dist.rank, n, dist.world))
    passkey = hasattr(dataset, "sample_with_answer")
    nll, count, correct = 0.0, 0, 0
    start = time.perf_counter()
    for first in range(0, len(mine), batch_size):
        indices = mine[first : first + batch_size]
        if passkey:
            pairs = [dataset.sample_with_answer(i) for i in indices]
            ids = torch.stack([p[0] for p in pairs])
        else:
            ids = dataset.batch(indices)
        if fingerprint is not None:
            fingerprint.update(ids)
        ids = ids.to(device)
        losses, logits = token_losses(model, ids, precision, device)
        nll += float(losses.double().sum())
        count += losses.numel()
        if passkey:
            guesses = logits.argmax(-1)  # guesses[:, t] predicts ids[:, t + 1]
            for row, (_, answer) in enumerate(pairs):
                correct += int(torch.equal(guesses[row, -answer:], ids[row, -answer:]))
        if progress is not None:
            progress(min(first + batch_size, len(mine)), len(mine))
    synchronize(device)
    seconds = time.perf_counter() - start
    nll, count, correct = all_reduce_sum([nll, count, correct], dist, device)
    model.train(was_training)
    loss = nll / count if count else float("nan")
    metrics = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": loss / math.log(2) / dataset.bytes_per_token if dataset.bytes_per_token else None,
        "tokens": int(count),
        "samples": n,
        "seconds": seconds,
        "tokens_per_s": count / seconds if seconds > 0 else None,
    }
    if passkey:
        metrics["passkey_accuracy"] = correct / n if n else None
    return metrics
