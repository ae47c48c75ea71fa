"""`toroidal.ring`: ring attention on 1, 2 and 4 spawned gloo processes against the single-process reference.

Every case of a world size runs inside one spawned group (spawning costs seconds);
each rank compares its own output and its q/k/v gradient shards, gathered, with
`toroidal_attention(backend="reference")` on the full sequence. No timing assertions.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import assert_one_line_error

from toroidal import toroidal_attention
from toroidal.ring import (
    chunk_starts,
    gather_sequence,
    ring_attention,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from toroidal.runtime.launch import RankFailed, run_local_group

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5  # float32, as for every backend against the reference


def _case(causal, window, period, layout, n=16) -> dict:
    return dict(n=n, depth=2, lambda_distance=0.3, causal=causal, window=window, period=period, layout=layout)


# Causal or not, window or not, P = N or P < N (the ring wraps inside the sequence), both layouts.
GRID = [
    _case(causal, window, period, layout)
    for causal in (False, True)
    for window in (None, 3)
    for period in (None, 6)
    for layout in ("contiguous", "zigzag")
]
# Half of it in which every pair of two options' values still occurs (layout = xor of the others).
HALF_GRID = [case for case in GRID if (case["layout"] == "zigzag") == (
    case["causal"] ^ (case["window"] is None) ^ (case["period"] is None)
)]  # fmt: skip


# Beyond the grid: key padding (left-padded rows that see nothing under causal masking), grouped
# k/v heads, a tile that cuts platter groups, D = 1, an explicit scale, a window that reaches
# across the seam from the last rank to the first.
EXTRA = [
    {**_case(True, None, None, "zigzag"), "pad": True},
    {**_case(False, 2, None, "contiguous"), "pad": True},
    {**_case(True, 5, None, "zigzag"), "depth": 4, "kv_heads": 1},
    {**_case(False, None, None, "zigzag"), "tile": 3},
    {**_case(True, 4, 10, "contiguous"), "depth": 1, "lambda_distance": 1.0, "scale": 0.7},
    {**_case(False, 2, None, "contiguous", n=24), "lambda_distance": 0.0},
]


def _compare_case(case: dict, group=None) -> list[float]:
    """Max abs error of the output and of the q, k, v gradients: ring (gathered) against the reference."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    case = dict(case)
    n, layout = case.pop("n"), case.pop("layout")
    pad, kv_heads = case.pop("pad", False), case.pop("kv_heads", 2)
    tile = case.pop("tile", 8)
    generator = torch.Generator().manual_seed(n)  # every rank draws the same full tensors
    q = torch.randn(2, 2, n, 8, generator=generator)
    k, v = (torch.randn(2, kv_heads, n, 8, generator=generator) for _ in range(2))
    grad = torch.randn(2, 2, n, 8, generator=generator)
    mask = None
    if pad:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, :3] = False  # under causal masking queries 0-2 of row 0 see nothing
        mask[1, -5:] = False
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = toroidal_attention(*full, key_padding_mask=mask, backend="reference", **case)
    expected.backward(grad)
    local = [shard_sequence(t, rank, world, layout).requires_grad_() for t in (q, k, v)]
    local_mask = shard_sequence(mask, rank, world, layout, dim=1) if pad else None
    out = ring_attention(*local, key_padding_mask=local_mask, layout=layout, tile=tile, group=group, **case)
    out.backward(shard_sequence(grad, rank, world, layout))
    errors = [(gather_sequence(out.detach(), layout, group) - expected).abs().max().item()]
    for shard, whole in zip(local, full, strict=True):
        errors.append((gather_sequence(shard.grad, layout, group) - whole.grad).abs().max().item())
    return errors


def _compare_cases(rank: int, world: int, cases: list[dict], subgroups: list[list[int]]) -> dict:
    """The cases on the whole world, then on each rank's subgroup (rings of other sizes, other peers)."""
    results = {world: [_compare_case(case) for case in cases]}
    if subgroups:
        group, _ = dist.new_subgroups_by_enumeration(subgroups)
        results[len(subgroups[0])] = [_compare_case(case, group) for case in cases[::4]]
    return results


# One spawned world per size (spawning costs seconds). Subgroups add a ring of one rank (no
# communication) and a ring of two ranks that are not neighbours in the world ({0, 2}, {1, 3}).
@pytest.mark.parametrize(
    "world, cases, subgroups",
    [(2, GRID + EXTRA, [[0], [1]]), (4, HALF_GRID + EXTRA[:3], [[0, 2], [1, 3]])],
    ids=["W2+W1", "W4+W2"],
)
def test_ring_matches_reference_values_and_gradients(world, cases, subgroups):
    per_rank = run_local_group(_compare_cases, world, (cases, subgroups))
    for rank, by_size in enumerate(per_rank):
        assert sorted(by_size) == sorted({world, len(subgroups[0])})
        for size, results in by_size.items():
            ran = cases if size == world else cases[::4]
            for case, errors in zip(ran, results, strict=True):
                worst = max(errors)
                assert worst < TOLERANCE, f"rank {rank} in a ring of {size}, {case}: out/dq/dk/dv {errors}"


def _give_up(rank: int, world: int) -> None:
    raise ValueError(f"rank {rank} gives up")


def test_a_failing_rank_is_reported_with_its_message():
    with pytest.raises(RankFailed, match="rank 0 failed: ValueError: rank 0 gives up"):
        run_local_group(_give_up, 1, timeout_s=20)


# --- layouts, in this process -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shards_round_trip_and_name_their_positions(layout):
    x = torch.arange(2 * 24).reshape(2, 24)
    shards = [shard_sequence(x, rank, 3, layout, dim=1) for rank in range(3)]
    assert torch.equal(unshard_sequence(shards, layout, dim=1), x)
    for rank, shard in enumerate(shards):
        assert torch.equal(shard[0], sequence_positions(layout, rank, 3, 8))


def test_zigzag_pairs_an_early_chunk_with_a_late_one():
    assert [chunk_starts("zigzag", rank, 2, 4) for rank in range(2)] == [[0, 6], [2, 4]]
    assert [chunk_starts("contiguous", rank, 2, 4) for rank in range(2)] == [[0], [4]]


@pytest.mark.parametrize(
    "layout, n, fragment", [("contiguous", 10, "multiple of 4"), ("zigzag", 12, "multiple of 8")]
)
def test_a_sequence_that_does_not_divide_is_refused(layout, n, fragment):
    with pytest.raises(ValueError, match=fragment):
        shard_sequence(torch.zeros(1, 1, n, 2), 0, 4, layout)


def test_ring_attention_needs_a_process_group_and_a_known_layout():
    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown layout 'spiral'"):
        ring_attention(q, q, q, depth=2, layout="spiral")
    with pytest.raises(ValueError, match="even shard length"):
        ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3], depth=2, layout="zigzag")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q, depth=2)


# --- bench ----------------------------------------------------------------------------------------------
# The spawned ranks import this module: the bench and CLI imports stay inside the tests that use them.


def test_sweep_adds_ring_rows_after_each_shape():
    from toroidal.bench import BenchSweep

    sweep = BenchSweep(backend=["sdpa", "blockwise"], seq_len=[8, 16], ring_world_size=[2, 4])
    rows = [(case.seq_len, case.backend, case.ring_world_size) for case in sweep.cases()]
    assert rows == [
        (n, backend, world)
        for n in (8, 16)
        for backend, world in (("sdpa", None), ("blockwise", None), ("ring", 2), ("ring", 4))
    ]


def test_bench_ring_rows_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from toroidal_cli.app import app
    from toroidal_cli.results import read_result

    out = tmp_path / "ring.json"
    args = ["bench", "-n", "6,8", "--d-model", "16", "--heads", "2", "--depth", "2", "-b", "sdpa"]
    args += ["--mode", "fwd+bwd", "--warmup", "0", "--repeats", "2", "--ring-world-size", "2", "--no-isolate"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_result(out, command="bench")["rows"]
    assert [(row["seq_len"], row["backend"], row["ring_world_size"]) for row in rows] == [
        (6, "sdpa", None),
        (6, "ring", 2),
        (8, "sdpa", None),
        (8, "ring", 2),
    ]
    skipped, ring = rows[1], rows[3]
    assert skipped["status"] == "skipped" and "divisible by 4" in skipped["reason"]
    assert ring["status"] == "ok" and ring["chosen"] == "zigzag", ring["reason"]
    assert ring["peak_memory_mb"] > 0 and "2 ranks" in ring["memory_method"]
    assert ring["overhead"] > 0 and ring["vs_standard"] > 0 and ring["sdpa_torus_ms"] > 0


def test_bench_refuses_a_world_size_below_one():
    from typer.testing import CliRunner

    from toroidal_cli.app import app

    result = CliRunner().invoke(app, ["bench", "--ring-world-size", "0"])
    assert_one_line_error(result, "--ring-world-size", "integer >= 1")
