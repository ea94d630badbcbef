"""Presets (parameter counts, state-dict names/shapes vs the TSVs), step tables, upstream YAML."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from deltadiff.errors import ConfigError
from deltadiff.model.config import (
    EXPECTED_PARAMS,
    PRESETS,
    ScheduleConfig,
    from_upstream_yaml,
    preset,
    to_upstream_yaml_dict,
)
from deltadiff.model.schedule import etas, make_step_table, sqrt_etas, step_table
from deltadiff.model.swin_unet import SwinUNet, relative_position_index, shift_mask
from deltadiff.model.vq_f4 import VQModel

from .checks import read_tsv
from .conftest import GOLDEN, SPEC, need_shared


def _n(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    ("family", "tsv"),
    [
        ("deltadiff-pixel", "keys_deltadiff_unet.tsv"),
        ("deltadiff-latent", "keys_resshift_unet.tsv"),
    ],
)
def test_full_unet_parameter_count_and_state_dict_equal_upstream_tsv(family, tsv):
    net = SwinUNet(preset(family).unet)
    assert _n(net) == EXPECTED_PARAMS[family][0]
    ref = read_tsv(need_shared(SPEC / tsv))
    mine = {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in net.state_dict().items()
    }
    assert list(mine) == list(ref)  # names and order
    assert mine == {k: (s, d) for k, (s, d, _kind) in ref.items()}


def test_full_vq_parameter_count_and_state_dict_equal_upstream_tsv():
    vq = VQModel(preset("resshift-v3").vq)
    assert _n(vq) == 55_322_782
    assert _n(vq.encoder) == 22_337_411 and _n(vq.decoder) == 32_960_771
    ref = read_tsv(need_shared(SPEC / "keys_vqgan_f4.tsv"))
    mine = {k: (tuple(v.shape), "float32") for k, v in vq.state_dict().items()}
    assert mine == {k: (s, d) for k, (s, d, _kind) in ref.items()}


# (UNet, VQ) parameters of every preset, counted independently of EXPECTED_PARAMS: the full
# presets from MODEL.md §7.2 (upstream class definitions), the demo model from its model card
# (README), the small presets as first built (a guard against silent architecture drift).
PARAMS = {
    "deltadiff-latent": (118_593_583, 55_322_782),
    "deltadiff-pixel": (2_883_913, 0),
    "resshift-v3": (118_593_583, 55_322_782),
    "deltadiff-latent-small": (4_026_887, 3_473_470),
    "deltadiff-pixel-small": (749_159, 0),
    "resshift-v3-small": (4_026_887, 3_473_470),
    "demo-pixel": (1_257_927, 0),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_every_preset_builds_with_its_expected_parameter_count(name):
    cfg = preset(name)
    vq = _n(VQModel(cfg.vq)) if cfg.vq is not None else 0
    assert (_n(SwinUNet(cfg.unet)), vq) == PARAMS[name]
    if name in EXPECTED_PARAMS:  # the library's own table agrees with the spec
        assert EXPECTED_PARAMS[name] == PARAMS[name]


def test_presets_cover_all_three_families_and_the_table_covers_every_preset():
    assert set(PARAMS) == set(PRESETS)
    assert {p.family for p in PRESETS.values()} == {
        "deltadiff-latent",
        "deltadiff-pixel",
        "resshift-v3",
    }


# MODEL.md §1.6 (10-decimal values); rows in execution order t = 3, 2, 1, 0: (in_scale, a, b, c, s)
TABLES = {
    "deltadiff-latent": [
        (0.4490132551, 0.5457040522, 0.4542959478, 0, 0),
        (0.5624560249, 0.4151377943, 0.5848622057, 0, 0),
        (0.7260290429, 0.0222938645, 0.9777061355, 0, 0),
        (0.9901475430, 0.0, 1.0, 0, 0),
    ],
    "deltadiff-pixel": [
        (0.4490132551, 0, 1, 0, 0),
        (0.5624560249, 0, 1, 0, 0),
        (0.7260290429, 0, 1, 0, 0),
        (0.9901475430, 0, 1, 0, 0),
    ],
    "resshift-v3": [
        (0.4508164918, 0.5914728453, 0.4085271547, 0, 0.9732917907),
        (0.5489196726, 0.4666190326, 0.5333809674, 0, 0.7596832965),
        (0.6930419746, 0.0369685444, 0.9630314556, 0, 0.1962683322),
        (0.9805806757, 0.0, 1.0, 0, 0),
    ],
}


@pytest.mark.parametrize("family", sorted(TABLES))
def test_step_table_equals_model_md_to_1e9(family):
    table = step_table(preset(family))
    assert [r.t for r in table.rows] == [3, 2, 1, 0]
    got = np.array([(r.in_scale, r.a, r.b, r.c, r.s) for r in table.rows])
    np.testing.assert_allclose(got, np.array(TABLES[family], dtype=np.float64), rtol=0, atol=1e-9)
    assert table.s_prior == (pytest.approx(1.98, abs=1e-12) if family == "resshift-v3" else 0.0)


def test_pixel_renoise_rule_equals_model_md():
    t = make_step_table(preset("deltadiff-pixel").schedule, "pixel-renoise")
    got = [(r.b, r.c) for r in t.rows]
    want = [(0.4597529883, 0.5402470117), (0.7757230472, 0.2242769528), (0.995, 0.005), (1.0, 0.0)]
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_schedule_generator_and_alternative_readings():
    dd = preset("deltadiff-pixel").schedule
    np.testing.assert_allclose(sqrt_etas(dd), [0.005, 0.2242769528, 0.5402470117, 0.99], atol=1e-9)
    # R2 (Eq. 7 with sqrt on the left): eta = sqrt_etas**2 with start 0.01/kappa... start = 0.1
    r2 = ScheduleConfig(min_noise_level=0.2, etas_end=0.99**0.5, squared=True)
    np.testing.assert_allclose(etas(r2), [0.01, 0.2724626133, 0.5848844744, 0.99], atol=1e-9)
    r3 = ScheduleConfig(min_noise_level=0.01, etas_end=0.99, squared=True)
    np.testing.assert_allclose(etas(r3), [0.000025, 0.0503001516, 0.2918668336, 0.9801], atol=1e-9)
    rows = {  # Table II rows read with R1: (start, end) -> a_t for t = 0..3
        (0.01, 0.8): [0, 0.0259863934, 0.4301078767, 0.5591864167],
        (0.2, 0.99): [0, 0.1922720583, 0.6830951856, 0.7690727178],
        (0.5, 0.999): [0, 0.3692300691, 0.7942973857, 0.8532854215],
    }
    for (lo, hi), a in rows.items():
        t = make_step_table(ScheduleConfig(min_noise_level=lo, etas_end=hi), "posterior")
        np.testing.assert_allclose([r.a for r in reversed(t.rows)], a, atol=1e-9)


def test_relative_position_index_and_shift_mask_constants():
    idx = relative_position_index(8)
    assert idx[0, 0] == 112 and idx[0, 63] == 0 and idx[63, 0] == 224
    assert idx[9, 0] == 128 and idx[0, 9] == 96 and idx[7, 8] == 104
    m = shift_mask(32, 32, 8, 4).numpy()
    assert m.shape == (16, 64, 64)
    assert [int((m[w] == -100).sum()) for w in range(16)] == [0] * 12 + [2048] * 4
    assert int((shift_mask(64, 64, 8, 4).numpy() == -100).sum()) == 8 * 2048


def test_upstream_yaml_of_both_repositories_parses():
    dd = from_upstream_yaml(need_shared(GOLDEN / "deltadiff_unet_pixel" / "config.yaml"))
    assert dd.family == "deltadiff-pixel" and dd.step_rule == "x0" and dd.upsampler == "matlab"
    assert dd.unet == preset("deltadiff-pixel").unet
    rs = from_upstream_yaml(GOLDEN / "resshift_step" / "config.yaml")
    assert rs.family == "resshift-v3" and rs.schedule.squared and rs.vq.n_embed == 512
    lat = from_upstream_yaml(GOLDEN / "resshift_step" / "config.yaml", family="deltadiff-latent")
    assert lat.schedule == preset("deltadiff-latent").schedule and lat.step_rule == "posterior"


def test_our_yaml_writer_round_trips_through_the_upstream_parser(tmp_path):
    for name in ("deltadiff-pixel", "resshift-v3", "demo-pixel"):
        cfg = preset(name)
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(to_upstream_yaml_dict(cfg)))
        back = from_upstream_yaml(p)
        assert (back.family, back.unet, back.vq, back.schedule) == (
            cfg.family,
            cfg.unet,
            cfg.vq,
            cfg.schedule,
        )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("model: {params: {model_channels: 48}}", "multiple of 32"),
        ("model: {params: {use_scale_shift_norm: false}}", "use_scale_shift_norm"),
        ("model: {params: {bogus_key: 1}}", "unsupported keys"),
        ("- just a list", "mapping"),
        ("model: [unclosed", "not valid YAML"),
        ("foo: 1", "no model.params"),
    ],
)
def test_bad_yaml_gives_one_clear_error(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(
        text
        + "\ndiffusion: {target: models.script_util.create_RESDIF, params: {min_noise_level: 0.01, etas_end: 0.99}}\n"
        if text.startswith("model")
        else text
    )
    with pytest.raises(ConfigError, match=match):
        from_upstream_yaml(p)


def test_unknown_preset_names_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        preset("nope")
