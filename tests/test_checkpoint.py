"""Checkpoint loading: every upstream layout, named mismatch errors, bad files (MODEL.md §5)."""

from __future__ import annotations

import pickle

import pytest
import torch

from deltadiff.errors import CheckpointError
from deltadiff.model.checkpoint import canonicalize, detect, load_weights_into, read_weights
from deltadiff.model.config import preset
from deltadiff.model.pipeline import Pipeline, randomize_
from deltadiff.model.swin_unet import SwinUNet
from deltadiff.model.vq_f4 import VQModel

from .checks import LAYOUTS, state_from_tsv, write_layout
from .conftest import GOLDEN, SPEC, need_shared


def _assert_loads_correctly(net: torch.nn.Module, sd: dict, tmp_path, what: str) -> None:
    for layout in LAYOUTS:
        path = write_layout(sd, layout, tmp_path / f"{what}-{layout}.pth")
        fresh = type(net)(net.cfg)
        load_weights_into(fresh, path, what=what, config_desc="test")
        got = fresh.state_dict()
        for k, v in sd.items():
            if k.endswith("attn_mask"):
                continue  # ignored: recomputed from the runtime size
            assert torch.equal(got[k], v), f"{layout}: {k} not loaded"


def test_full_deltadiff_unet_loads_from_every_layout(tmp_path):
    sd = state_from_tsv(need_shared(SPEC / "keys_deltadiff_unet.tsv"))
    assert detect(sd) == "deltadiff-unet"
    _assert_loads_correctly(SwinUNet(preset("deltadiff-pixel").unet), sd, tmp_path, "UNet")


@pytest.mark.slow
def test_full_resshift_unet_and_vq_load_from_every_layout(tmp_path):
    sd = state_from_tsv(need_shared(SPEC / "keys_resshift_unet.tsv"))
    assert detect(sd) == "resshift-unet"
    _assert_loads_correctly(SwinUNet(preset("resshift-v3").unet), sd, tmp_path, "UNet")
    del sd
    vq = state_from_tsv(SPEC / "keys_vqgan_f4.tsv")
    assert detect(vq) == "vq-f4"
    _assert_loads_correctly(VQModel(preset("resshift-v3").vq), vq, tmp_path, "VQ")


def test_small_resshift_unet_and_vq_load_from_every_layout(tmp_path):
    cfg = preset("resshift-v3-small")
    unet, vq = SwinUNet(cfg.unet), VQModel(cfg.vq)
    randomize_(unet, 1)
    randomize_(vq, 2)
    _assert_loads_correctly(unet, unet.state_dict(), tmp_path, "UNet")
    _assert_loads_correctly(vq, vq.state_dict(), tmp_path, "VQ")


def test_golden_checkpoints_load_through_yaml(tmp_path):
    pipe = Pipeline.from_yaml(need_shared(GOLDEN / "resshift_step" / "config.yaml"))
    assert pipe.cfg.family == "resshift-v3" and pipe.vq is not None
    pipe = Pipeline.from_yaml(GOLDEN / "deltadiff_unet_pixel" / "config.yaml")
    assert pipe.cfg.family == "deltadiff-pixel"


def test_wrong_family_lists_mismatches_and_config(tmp_path):
    sd = state_from_tsv(need_shared(SPEC / "keys_deltadiff_unet.tsv"))
    path = write_layout(sd, "trainer", tmp_path / "dd.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights_into(
            SwinUNet(preset("resshift-v3-small").unet),
            path,
            what="UNet",
            config_desc="resshift-v3-small",
        )
    msg = str(e.value)
    assert "resshift-v3-small" in msg and "deltadiff-unet" in msg
    assert "331 missing:" in msg and "mis-shaped" in msg
    assert "\n" not in msg


def test_missing_and_unexpected_keys_are_named_with_counts(tmp_path):
    net = SwinUNet(preset("deltadiff-pixel-small").unet)
    sd = dict(net.state_dict())
    sd.pop("out.2.weight")
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["time_embed.0.weight"] = torch.zeros(3, 3)
    path = write_layout(sd, "raw", tmp_path / "m.pth")
    with pytest.raises(
        CheckpointError,
        match=r"2 missing: out\.2\.weight, out\.2\.bias; 1 unexpected: extra\.weight; 1 mis-shaped.*time_embed\.0\.weight \(3, 3\)",
    ):
        load_weights_into(net, path, what="UNet", config_desc="small")


def test_attn_mask_buffers_are_ignored_and_bad_position_index_rejected(tmp_path):
    net = SwinUNet(preset("resshift-v3-small").unet)
    sd = dict(net.state_dict())
    sd["input_blocks.1.1.blocks.1.attn_mask"] = torch.full_like(
        sd["input_blocks.1.1.blocks.1.attn_mask"], 7.0
    )
    load_weights_into(
        net, write_layout(sd, "raw", tmp_path / "a.pth"), what="UNet", config_desc="s"
    )
    key = "input_blocks.1.1.blocks.0.attn.relative_position_index"
    sd[key] = torch.zeros_like(sd[key])
    with pytest.raises(CheckpointError, match="relative_position_index differs"):
        load_weights_into(
            net, write_layout(sd, "raw", tmp_path / "b.pth"), what="UNet", config_desc="s"
        )


def test_checkpoint_without_position_index_still_loads(tmp_path):
    net = SwinUNet(preset("deltadiff-pixel-small").unet)
    sd = {k: v for k, v in net.state_dict().items() if "relative_position_index" not in k}
    load_weights_into(
        net, write_layout(sd, "raw", tmp_path / "a.pth"), what="UNet", config_desc="s"
    )


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_give_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(SwinUNet(preset("deltadiff-pixel-small").unet).state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("this is not a checkpoint\n")
    with (tmp_path / "evil.pth").open("wb") as fh:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, fh)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": _Evil()}))
    (tmp_path / "trunc.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    cases = {
        "trunc.pth": "truncated or corrupt",
        "empty.pth": "empty",
        "text.pth": "not a PyTorch checkpoint",
        "evil.pth": "refusing to execute",
        "raw.pkl": "refusing to execute|not a PyTorch|cannot be read",
        "trunc.safetensors": "safetensors",
        "missing.pth": "does not exist",
    }
    for name, match in cases.items():
        with pytest.raises(CheckpointError, match=match) as e:
            read_weights(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="directory"):
        read_weights(tmp_path)


def test_non_state_dict_objects_are_rejected():
    with pytest.raises(CheckpointError, match="not a state dict"):
        canonicalize([1, 2, 3])
    with pytest.raises(CheckpointError, match="no tensors"):
        canonicalize({"iters_start": 5})


def test_ema_preference_picks_ema_weights():
    a, b = torch.zeros(2), torch.ones(2)
    obj = {"state_dict": {"w": a}, "ema": {"module.w": b}}
    assert torch.equal(canonicalize(obj)["w"], a)
    assert torch.equal(canonicalize(obj, ema=True)["w"], b)
