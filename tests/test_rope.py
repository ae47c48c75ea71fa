import math

import pytest
import torch

from toroidal.fusion import DepthFusion
from toroidal.rope import ToroidalRotary, frequency_bases, orthogonality_score, periodic_multiples


def test_orthogonality_scores():
    assert orthogonality_score("standard", 16) > 0.99  # parallel bases: platter k aliases position shift
    assert orthogonality_score("orthogonal", 16) < 1e-6
    assert orthogonality_score("periodic", 16, period=64) < 1e-6


def test_periodic_frequencies_are_integer_multiples_of_two_pi_over_p():
    seq, _ = frequency_bases("periodic", 16, 10000.0, period=50)
    multiples = periodic_multiples(8, 50, 10000.0)
    assert torch.allclose(seq, 2 * math.pi * multiples.double() / 50)
    assert (multiples >= 1).all()


def test_rotation_preserves_norm_and_is_relative():
    rot = ToroidalRotary("orthogonal", head_dim=16, depth=2)
    x = torch.randn(1, 1, 6, 16)
    y = rot(x)
    norms = lambda t: t.reshape(1, 1, 6, 2, 8).norm(dim=-1)
    assert torch.allclose(norms(x), norms(y), atol=1e-5)
    # Scores between the same vectors placed at positions (i, j) depend on i - j only.
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    r = rot(q)
    dots = (r[..., :8] @ r[..., :8].transpose(-1, -2))[0, 0]
    assert torch.allclose(dots[0, 2], dots[3, 5], atol=1e-5)


def test_periodic_rotation_repeats_with_the_period():
    rot = ToroidalRotary("periodic", head_dim=8, depth=2)
    x = torch.randn(1, 1, 1, 8)
    assert torch.allclose(rot(x, start=3, period=10), rot(x, start=13, period=10), atol=1e-6)


def test_bad_modes():
    with pytest.raises(ValueError):
        ToroidalRotary("spiral", 16, 2)
    with pytest.raises(ValueError):
        DepthFusion("sum", 2, 2)


def test_fusion_modes_shapes_and_mean():
    x = torch.randn(2, 3, 5, 8)
    for mode in ("low_rank", "attention", "mean", "concat"):
        assert DepthFusion(mode, n_heads=3, depth=4)(x).shape == x.shape
    mean = DepthFusion("mean", 3, 4)(x).reshape(2, 3, 5, 4, 2)
    assert torch.allclose(mean[..., 0, :], x.reshape(2, 3, 5, 4, 2).mean(3))
    low = DepthFusion("low_rank", 3, 8)
    assert low.u.shape == (3, 8, 2)  # r = max(1, D // 4)
    assert torch.equal(low.mixing_matrix(), torch.eye(8).expand(3, 8, 8))
