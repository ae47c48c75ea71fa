import torch
from hypothesis import given
from hypothesis import strategies as st

from toroidal.geometry import (
    TorusGeometry,
    expand_key_padding,
    position_allowed,
    ring_distance,
    toroidal_distance,
)

periods = st.integers(1, 64)
ints = st.integers(-200, 200)


@given(ints, ints, periods)
def test_ring_distance_symmetric_bounded_periodic(i, j, p):
    d = ring_distance(i, j, p)
    assert d == ring_distance(j, i, p)
    assert 0 <= d <= p // 2
    assert d == ring_distance(i + p, j, p) == ring_distance(i, j - 3 * p, p)


@given(ints, st.integers(0, 7), periods, st.integers(1, 8))
def test_toroidal_distance_identity(i, k, p, depth):
    assert toroidal_distance(i, k % depth, i, k % depth, p, depth) == 0


def test_wrap_around():
    assert ring_distance(0, 9, 10) == 1
    assert ring_distance(0, 5, 10) == 5
    assert toroidal_distance(0, 0, 9, 3, 10, 4) == 1 / 10 + 3 / 4


def test_tensor_and_int_forms_agree():
    i = torch.arange(12)[:, None]
    j = torch.arange(12)[None, :]
    table = ring_distance(i, j, 7)
    assert all(table[a, b] == ring_distance(a, b, 7) for a in range(12) for b in range(12))


def test_causal_and_window_rules_include_the_seam():
    # Position 9 on a ring of 10 with window 2 sees its recent past 7, 8, 9 and, across the
    # seam, the start of the ring 0, 1; position 1 sees, bidirectionally, the seam 9 too.
    assert [j for j in range(10) if position_allowed(9, j, True, 2, 10)] == [0, 1, 7, 8, 9]
    assert [j for j in range(10) if position_allowed(1, j, False, 2, 10)] == [0, 1, 2, 3, 9]
    assert [j for j in range(10) if position_allowed(1, j, True, 2, 10)] == [0, 1]


def test_geometry_block_matches_index_functions():
    g = TorusGeometry(depth=3, period=5, lambda_distance=0.7, causal=True, window=1, q_offset=2)
    bias, allowed = g.block(0, 6, 0, 12)
    for p in range(6):
        i, k = 2 + p // 3, p % 3
        for q in range(12):
            j, l = q // 3, q % 3
            expect = -0.7 * (ring_distance(i, j, 5) / 5 + abs(k - l) / 3)
            assert abs(bias[p, q].item() - expect) < 1e-6
            assert bool(allowed[p, q]) == (j <= i and ring_distance(i, j, 5) <= 1)


def test_position_mask_and_wraps():
    g = TorusGeometry(depth=2, period=8, lambda_distance=0.1, causal=True)
    assert torch.equal(g.position_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    assert not g.wraps(4, 4)  # |i - j| <= 3 < P/2
    assert g.wraps(8, 8)


def test_expand_key_padding_is_position_major():
    mask = torch.tensor([[True, False]])
    assert expand_key_padding(mask, 3).tolist() == [[True, True, True, False, False, False]]


@given(
    n_queries=st.integers(1, 12),
    n_keys=st.integers(1, 12),
    offset=st.integers(0, 6),
    period=st.integers(1, 14),
    causal=st.booleans(),
    window=st.none() | st.integers(0, 8),
)
def test_linear_segments_cover_the_allowed_pairs_once_with_the_ring_distance(
    n_queries, n_keys, offset, period, causal, window
):
    geometry = TorusGeometry(1, period, 0.1, causal, window, q_offset=offset)
    segments = geometry.linear_segments(n_queries, n_keys, limit=1000)
    for i in range(offset, offset + n_queries):
        for j in range(n_keys):
            inside = [s for s in segments if s.lo <= i - j <= s.hi]
            assert len(inside) == int(position_allowed(i, j, causal, window, period)), (i, j, inside)
            for s in inside:
                assert s.slope * (i - j) + s.offset == ring_distance(i, j, period)


def test_linear_segments_give_up_past_the_limit():
    geometry = TorusGeometry(1, 8, 0.1, causal=True)
    assert len(geometry.linear_segments(8, 8, limit=4)) == 2  # near half and far half
    assert geometry.linear_segments(8, 8, limit=1) is None
    assert len(TorusGeometry(1, 8, 0.1, causal=False).linear_segments(8, 8, limit=4)) == 4
