import pytest

from toroidal import ToroidalConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_model": 100, "n_heads": 8}, "d_model"),
        ({"d_model": 64, "n_heads": 4, "depth": 3}, "depth"),
        ({"d_model": 48, "n_heads": 4, "depth": 4, "rope": "standard"}, "rope"),  # platter width 3
        ({"lambda_distance": -0.1}, "lambda_distance"),
        ({"lambda_distance": float("nan")}, "lambda_distance"),
        ({"window": -1}, "window"),
        ({"period": 0}, "period"),
        ({"rope": "spiral"}, "rope"),
        ({"fusion": "sum"}, "fusion"),
        ({"fusion_rank": 0}, "fusion_rank"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_heads": 0}, "n_heads"),
        ({"max_len": 2.5}, "max_len"),
        ({"depth": True}, "depth"),
    ],
)
def test_invalid_config_names_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=rf"ToroidalConfig\.{field}="):
        ToroidalConfig(**kwargs)


def test_odd_platter_width_is_fine_without_rope():
    cfg = ToroidalConfig(d_model=48, n_heads=4, depth=4, rope="none")
    assert cfg.platter_width == 3


def test_derived_fields_and_period_resolution():
    cfg = ToroidalConfig(d_model=512, n_heads=8, depth=4, max_len=1024)
    assert (cfg.head_dim, cfg.platter_width, cfg.resolved_fusion_rank) == (64, 16, 1)
    assert cfg.period_for(100) == 100  # bidirectional: the key length
    assert ToroidalConfig(causal=True, max_len=1024).period_for(100) == 1024
    assert ToroidalConfig(period=7, causal=True).period_for(100) == 7


def test_dict_round_trip_and_unknown_field():
    cfg = ToroidalConfig(depth=2, window=5, causal=True)
    assert ToroidalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ToroidalConfig.from_dict({"depht": 2})
