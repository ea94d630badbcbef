"""Model configurations: dataclasses, presets, and upstream YAML parsing (docs/design.md).

A ``ModelConfig`` fully describes one deployable model: its family, the networks it uses, the
schedule and the step rule. The schedule is configuration data; the step table is derived from it
in ``schedule.py``. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deltadiff.errors import ConfigError

Family = Literal["deltadiff-latent", "deltadiff-pixel", "resshift-v3"]
FAMILIES: tuple[str, ...] = ("deltadiff-latent", "deltadiff-pixel", "resshift-v3")
# How x_{t-1} is formed from x_t and x0_hat (the step table, docs/design.md):
#   posterior        x_{t-1} = eta_{t-1}/eta_t x_t + (1 - ..) x0_hat                 (deltadiff-latent)
#   x0               x_{t-1} = x0_hat                                                 (deltadiff-pixel, code)
#   posterior-noise  posterior mean + sigma_t n_t, prior noise kappa*sqrt_eta_T       (resshift-v3)
#   pixel-renoise    x_{t-1} = (1 - eta_{t-1}) x0_hat + eta_{t-1} y                   (optional)
StepRule = Literal["posterior", "x0", "posterior-noise", "pixel-renoise"]
STEP_RULES: tuple[str, ...] = ("posterior", "x0", "posterior-noise", "pixel-renoise")
Upsampler = Literal["torch", "matlab"]


@dataclass(frozen=True)
class UNetConfig:
    """``UNetModelSwin`` hyper-parameters, named as in upstream YAML ``model.params``."""

    image_size: int = 64  # only selects Swin layers and their window/shift rule (§2.1)
    in_channels: int = 3  # state channels; the first conv sees in_channels + 3 (cond)
    model_channels: int = 160
    out_channels: int = 3
    attention_resolutions: tuple[int, ...] = (64, 32, 16, 8)  # resolutions, not downsample factors
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: int = 1
    num_head_channels: int = 32  # -1: use num_heads
    swin_depth: int = 2
    swin_embed_dim: int = 192
    window_size: int = 8
    mlp_ratio: int = 4
    lq_size: int = 64  # must equal image_size (feature_extractor = Identity)

    def __post_init__(self) -> None:
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ConfigError(
                f"num_res_blocks {list(self.num_res_blocks)} must have one entry per channel_mult "
                f"level {list(self.channel_mult)}"
            )
        for c in self.channel_mults_widths() + (self.swin_embed_dim,):
            if c % 32:
                raise ConfigError(
                    f"channel width {c} is not a multiple of 32 (GroupNorm uses 32 groups); "
                    "choose model_channels / swin_embed_dim accordingly"
                )
        if self.lq_size != self.image_size:
            raise ConfigError(
                f"lq_size {self.lq_size} != image_size {self.image_size}: the upstream LR feature "
                "extractor for that case is not supported; set lq_size = image_size"
            )
        if self.swin_heads() * self.swin_head_dim() != self.swin_embed_dim:
            raise ConfigError(
                f"swin_embed_dim {self.swin_embed_dim} is not divisible by num_head_channels "
                f"{self.num_head_channels}"
            )

    def channel_mults_widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def swin_heads(self) -> int:
        if self.num_head_channels == -1:
            return self.num_heads
        return self.swin_embed_dim // self.num_head_channels

    def swin_head_dim(self) -> int:
        return self.swin_embed_dim // self.swin_heads()

    @property
    def size_multiple(self) -> int:
        """Spatial multiple the UNet input must have: 2^(levels-1) downsamples, then 8x8 windows."""
        return (2 ** (len(self.channel_mult) - 1)) * self.window_size


@dataclass(frozen=True)
class VQConfig:
    """``VQModelTorch`` hyper-parameters (upstream YAML ``autoencoder.params``)."""

    embed_dim: int = 3
    n_embed: int = 8192
    z_channels: int = 3
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.ch_mult) != 3:
            raise ConfigError(
                f"VQ ch_mult {list(self.ch_mult)} gives a downsampling factor other than 4; "
                "only the f4 autoencoder (3 levels) is supported"
            )

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """The exponential eta generator shared by the DeltaDiff and ResShift repositories."""

    steps: int = 4
    min_noise_level: float = 0.01
    etas_end: float = 0.99
    kappa: float = 2.0
    power: float = 0.3
    squared: bool = False  # True: eta = sqrt_etas**2 (ResShift); False: eta = sqrt_etas (DeltaDiff)

    def __post_init__(self) -> None:
        if not (
            self.min_noise_level > 0
            and 0 < self.etas_end <= 1
            and self.kappa > 0
            and self.power > 0
        ):
            raise ConfigError(
                f"schedule (min_noise_level {self.min_noise_level}, etas_end {self.etas_end}, kappa "
                f"{self.kappa}, power {self.power}) is invalid: need 0 < min_noise_level, "
                "0 < etas_end <= 1, kappa > 0, power > 0"
            )
        start = min(self.min_noise_level / self.kappa, self.min_noise_level)
        if start >= self.etas_end:
            raise ConfigError(
                f"schedule start {start} is not below etas_end {self.etas_end}; "
                "give min_noise_level,etas_end with start < end"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a deployable model, apart from the weights."""

    family: Family
    unet: UNetConfig
    schedule: ScheduleConfig
    vq: VQConfig | None = None
    step_rule: StepRule = "posterior"
    upsampler: Upsampler = "torch"
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}"
            )
        if self.step_rule not in STEP_RULES:
            raise ConfigError(
                f"unknown step rule {self.step_rule!r}; choose one of {', '.join(STEP_RULES)}"
            )
        if self.latent and self.vq is None:
            raise ConfigError(f"family {self.family} needs an autoencoder config (vq)")
        if not self.latent and self.vq is not None:
            raise ConfigError("family deltadiff-pixel has no autoencoder; drop the vq config")
        if self.schedule.steps != 4:
            raise ConfigError(
                f"schedule has {self.schedule.steps} steps; the toolkit serves 4-step models only"
            )

    @property
    def latent(self) -> bool:
        return self.family != "deltadiff-pixel"

    @property
    def lr_multiple(self) -> int:
        """LR size multiple the model needs (pixel: HR % unet multiple; latent: LR % unet multiple)."""
        m = self.unet.size_multiple
        if self.latent:
            return m  # latent = LR grid
        return max(1, m // 4)  # HR = 4 LR

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelConfig:
        try:
            unet = UNetConfig(**_tuples(d["unet"]))
            sched = ScheduleConfig(**d["schedule"])
            vq = VQConfig(**_tuples(d["vq"])) if d.get("vq") else None
            return ModelConfig(
                family=d["family"],
                unet=unet,
                schedule=sched,
                vq=vq,
                step_rule=d["step_rule"],
                upsampler=d["upsampler"],
                name=d.get("name", ""),
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"model config dict is malformed ({exc}); re-export the model"
            ) from None


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------
# Presets. Each full preset carries its expected parameter count (asserted in the tests).

RESSHIFT_UNET = UNetConfig()  # 118,593,583 params (the ResShift UNet)
DELTADIFF_UNET = UNetConfig(  # 2,883,913 params (the DeltaDiff UNet)
    image_size=48,
    model_channels=64,
    attention_resolutions=(32, 16, 8),  # matches no level (48, 24): only the middle Swin layer
    channel_mult=(1, 2),
    num_res_blocks=(1, 1),
    num_head_channels=16,
    swin_depth=1,
    swin_embed_dim=96,
    lq_size=48,
)
VQ_F4 = VQConfig()  # 55,322,782 params (the LDM vq-f4 first stage)

DELTADIFF_SCHEDULE = ScheduleConfig(min_noise_level=0.01, etas_end=0.99, squared=False)
RESSHIFT_V3_SCHEDULE = ScheduleConfig(min_noise_level=0.2, etas_end=0.99, squared=True)

# Small configs with the same structure, for fast tests (widths are multiples of 32).
SMALL_RESSHIFT_UNET = UNetConfig(
    model_channels=32, swin_embed_dim=64, channel_mult=(1, 2, 2, 4), num_res_blocks=(1, 1, 1, 1)
)
SMALL_DELTADIFF_UNET = dataclasses.replace(
    DELTADIFF_UNET, model_channels=32, swin_embed_dim=64, num_head_channels=16
)
SMALL_VQ = VQConfig(ch=32, n_embed=512)

# The bundled demo model: the deltadiff-pixel structure with 64 channels at both levels (about
# half the MACs of the official config) for the CPU speed target. Widths stay >= 64: GroupNorm(32)
# on 32 channels is an InstanceNorm that removes every feature map's mean, and a 32-channel model
# trained here could not reproduce image brightness (mean colour error 0.04 vs 0.0001 for bicubic).
DEMO_UNET = dataclasses.replace(
    DELTADIFF_UNET, model_channels=64, channel_mult=(1, 1), swin_embed_dim=64, num_head_channels=16
)

PRESETS: dict[str, ModelConfig] = {
    "deltadiff-latent": ModelConfig(
        "deltadiff-latent", RESSHIFT_UNET, DELTADIFF_SCHEDULE, VQ_F4, "posterior", "torch"
    ),
    "deltadiff-pixel": ModelConfig(
        "deltadiff-pixel", DELTADIFF_UNET, DELTADIFF_SCHEDULE, None, "x0", "matlab"
    ),
    "resshift-v3": ModelConfig(
        "resshift-v3", RESSHIFT_UNET, RESSHIFT_V3_SCHEDULE, VQ_F4, "posterior-noise", "torch"
    ),
    "deltadiff-latent-small": ModelConfig(
        "deltadiff-latent", SMALL_RESSHIFT_UNET, DELTADIFF_SCHEDULE, SMALL_VQ, "posterior", "torch"
    ),
    "deltadiff-pixel-small": ModelConfig(
        "deltadiff-pixel", SMALL_DELTADIFF_UNET, DELTADIFF_SCHEDULE, None, "x0", "matlab"
    ),
    "resshift-v3-small": ModelConfig(
        "resshift-v3",
        SMALL_RESSHIFT_UNET,
        RESSHIFT_V3_SCHEDULE,
        SMALL_VQ,
        "posterior-noise",
        "torch",
    ),
    "demo-pixel": ModelConfig(
        "deltadiff-pixel", DEMO_UNET, DELTADIFF_SCHEDULE, None, "x0", "matlab"
    ),
}
PRESETS = {k: v.replace(name=k) for k, v in PRESETS.items()}

# Parameter counts of the full presets (UNet, VQ), as in the upstream checkpoints.
EXPECTED_PARAMS = {
    "deltadiff-latent": (118_593_583, 55_322_782),
    "deltadiff-pixel": (2_883_913, 0),
    "resshift-v3": (118_593_583, 55_322_782),
}

DEFAULT_STEP_RULE: dict[str, str] = {
    "deltadiff-latent": "posterior",
    "deltadiff-pixel": "x0",
    "resshift-v3": "posterior-noise",
}
DEFAULT_UPSAMPLER: dict[str, str] = {
    "deltadiff-latent": "torch",
    "deltadiff-pixel": "matlab",
    "resshift-v3": "torch",
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Upstream YAML (both repositories' schema: model / autoencoder / diffusion sections).

_UNET_KEYS = {f.name for f in dataclasses.fields(UNetConfig)}
# upstream keys that do not change the network we build (validated where they matter)
_UNET_IGNORED = {
    "dropout",
    "conv_resample",
    "dims",
    "use_fp16",
    "use_scale_shift_norm",
    "resblock_updown",
    "cond_lq",
    "cond_mask",
    "patch_norm",
    "num_heads_upsample",
    "use_checkpoint",
    "use_new_attention_order",
}
_UNET_REQUIRED_VALUES = {
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "conv_resample": True,
    "dims": 2,
    "cond_lq": True,
    "cond_mask": False,
    "patch_norm": False,
}


def unet_from_params(params: dict[str, Any], where: str = "model.params") -> UNetConfig:
    unknown = set(params) - _UNET_KEYS - _UNET_IGNORED
    if unknown:
        raise ConfigError(
            f"{where}: unsupported keys {sorted(unknown)}; this UNet is UNetModelSwin"
        )
    for k, want in _UNET_REQUIRED_VALUES.items():
        if k in params and params[k] != want:
            raise ConfigError(f"{where}.{k} = {params[k]!r} is not supported (only {want!r})")
    if params.get("dropout", 0) not in (0, 0.0):
        raise ConfigError(f"{where}.dropout must be 0 for inference configs")
    kw = {k: v for k, v in params.items() if k in _UNET_KEYS}
    for k in ("attention_resolutions", "channel_mult", "num_res_blocks"):
        if k in kw:
            v = kw[k]
            if isinstance(v, int):
                v = [v] * len(kw.get("channel_mult", UNetConfig.channel_mult))
            kw[k] = tuple(int(x) for x in v)
    if "lq_size" not in kw and "image_size" in kw:
        kw["lq_size"] = kw["image_size"]
    return UNetConfig(**kw)


def vq_from_params(params: dict[str, Any], where: str = "autoencoder.params") -> VQConfig:
    dd = dict(params.get("ddconfig", {}))
    if dd.get("double_z", False):
        raise ConfigError(f"{where}.ddconfig.double_z must be false (VQ autoencoder)")
    if dd.get("dropout", 0.0) not in (0, 0.0):
        raise ConfigError(f"{where}.ddconfig.dropout must be 0")
    if dd.get("z_channels", 3) != params.get("embed_dim", 3):
        # quant_conv maps z_channels -> embed_dim; allowed, kept as given
        pass
    try:
        return VQConfig(
            embed_dim=int(params.get("embed_dim", 3)),
            n_embed=int(params.get("n_embed", 8192)),
            z_channels=int(dd.get("z_channels", 3)),
            resolution=int(dd.get("resolution", 256)),
            in_channels=int(dd.get("in_channels", 3)),
            out_ch=int(dd.get("out_ch", 3)),
            ch=int(dd.get("ch", 128)),
            ch_mult=tuple(int(x) for x in dd.get("ch_mult", (1, 2, 4))),
            num_res_blocks=int(dd.get("num_res_blocks", 2)),
            attn_resolutions=tuple(int(x) for x in dd.get("attn_resolutions", ())),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed value ({exc})") from None


def schedule_from_params(params: dict[str, Any], target: str) -> ScheduleConfig:
    name = params.get("schedule_name", "exponential")
    if name != "exponential":
        raise ConfigError(
            f"diffusion.params.schedule_name {name!r}: only 'exponential' is supported"
        )
    if params.get("predict_type", "xstart") != "xstart":
        raise ConfigError("diffusion.params.predict_type must be 'xstart' (x0 prediction)")
    if params.get("timestep_respacing") not in (None, 4, "4"):
        raise ConfigError("diffusion.params.timestep_respacing must be null (identity map)")
    if float(params.get("scale_factor", 1.0)) != 1.0:
        raise ConfigError("diffusion.params.scale_factor must be 1.0")
    if not params.get("normalize_input", True):
        raise ConfigError("diffusion.params.normalize_input must be true")
    squared = not target.endswith("create_RESDIF")
    return ScheduleConfig(
        steps=int(params.get("steps", 4)),
        min_noise_level=float(params["min_noise_level"]),
        etas_end=float(params["etas_end"]),
        kappa=float(params.get("kappa", 2.0)),
        power=float((params.get("schedule_kwargs") or {}).get("power", 0.3)),
        squared=squared,
    )


def load_yaml(path: str | Path) -> dict[str, Any]:
    from deltadiff._deps import require

    yaml = require("yaml")
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a mapping of sections")
    return data


def from_upstream_yaml(
    path: str | Path,
    *,
    family: str | None = None,
    schedule: ScheduleConfig | None = None,
    step_rule: str | None = None,
) -> ModelConfig:
    """Build a ModelConfig from an upstream ResShift / DeltaDiff YAML.

    The family is inferred: ``create_RESDIF`` diffusion without an autoencoder is
    ``deltadiff-pixel``; ``create_gaussian_diffusion`` with an autoencoder is ``resshift-v3``.
    ``family='deltadiff-latent'`` runs a ResShift-layout config with the DeltaDiff schedule and
    rule (the paper's latent model); then the DeltaDiff default schedule is used unless given.
    """
    path = Path(path)
    data = load_yaml(path)
    if "model" not in data or "params" not in (data["model"] or {}):
        raise ConfigError(
            f"{path}: no model.params section; is this an upstream ResShift/DeltaDiff config?"
        )
    unet = unet_from_params(data["model"]["params"])
    vq = None
    if data.get("autoencoder"):
        vq = vq_from_params(data["autoencoder"].get("params", {}))
    diff = data.get("diffusion") or {}
    target = str(diff.get("target", ""))
    sched = None
    if diff.get("params"):
        sched = schedule_from_params(diff["params"], target)
    if family is None:
        if vq is None:
            family = "deltadiff-pixel"
        elif target.endswith("create_RESDIF"):
            family = "deltadiff-latent"
        else:
            family = "resshift-v3"
    if family == "deltadiff-latent" and (sched is None or sched.squared):
        sched = DELTADIFF_SCHEDULE
    if schedule is not None:
        sched = schedule
    if sched is None:
        raise ConfigError(f"{path}: no diffusion.params section and no schedule given")
    if family == "deltadiff-pixel":
        vq = None
    elif vq is None:
        raise ConfigError(
            f"{path}: family {family} needs an autoencoder section; pass the VQ config too"
        )
    return ModelConfig(
        family=family,
        unet=unet,
        schedule=sched,
        vq=vq,
        step_rule=step_rule or DEFAULT_STEP_RULE[family],
        upsampler=DEFAULT_UPSAMPLER[family],
        name=path.stem,
    )


def checkpoint_paths_from_yaml(path: str | Path) -> dict[str, Path]:
    """``ckpt_path`` entries of an upstream YAML, resolved relative to the YAML's folder."""
    path = Path(path)
    data = load_yaml(path)
    out: dict[str, Path] = {}
    for section, key in (("model", "unet"), ("autoencoder", "vq")):
        sec = data.get(section) or {}
        if sec.get("ckpt_path"):
            out[key] = (path.parent / str(sec["ckpt_path"])).resolve()
    return out


def to_upstream_yaml_dict(cfg: ModelConfig, ckpt_path: str = "") -> dict[str, Any]:
    """The upstream-schema YAML for a config (so our own checkpoints load like official ones)."""
    u = cfg.unet
    model_params = {
        "image_size": u.image_size,
        "in_channels": u.in_channels,
        "model_channels": u.model_channels,
        "out_channels": u.out_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "dropout": 0,
        "channel_mult": list(u.channel_mult),
        "num_res_blocks": list(u.num_res_blocks),
        "conv_resample": True,
        "dims": 2,
        "use_fp16": False,
        "num_head_channels": u.num_head_channels,
        "use_scale_shift_norm": True,
        "resblock_updown": False,
        "swin_depth": u.swin_depth,
        "swin_embed_dim": u.swin_embed_dim,
        "window_size": u.window_size,
        "mlp_ratio": u.mlp_ratio,
        "cond_lq": True,
        "lq_size": u.lq_size,
    }
    s = cfg.schedule
    out: dict[str, Any] = {
        "model": {
            "target": "models.unet.UNetModelSwin",
            "ckpt_path": ckpt_path,
            "params": model_params,
        },
        "diffusion": {
            "target": "models.script_util.create_gaussian_diffusion"
            if s.squared
            else "models.script_util.create_RESDIF",
            "params": {
                "sf": 4,
                "schedule_name": "exponential",
                "schedule_kwargs": {"power": s.power},
                "etas_end": s.etas_end,
                "steps": s.steps,
                "min_noise_level": s.min_noise_level,
                "kappa": s.kappa,
                "weighted_mse": False,
                "predict_type": "xstart",
                "timestep_respacing": None,
                "scale_factor": 1.0,
                "normalize_input": True,
                "latent_flag": True,
            },
        },
    }
    if cfg.vq is not None:
        v = cfg.vq
        out["autoencoder"] = {
            "target": "ldm.models.autoencoder.VQModelTorch",
            "params": {
                "embed_dim": v.embed_dim,
                "n_embed": v.n_embed,
                "ddconfig": {
                    "double_z": False,
                    "z_channels": v.z_channels,
                    "resolution": v.resolution,
                    "in_channels": v.in_channels,
                    "out_ch": v.out_ch,
                    "ch": v.ch,
                    "ch_mult": list(v.ch_mult),
                    "num_res_blocks": v.num_res_blocks,
                    "attn_resolutions": list(v.attn_resolutions),
                    "dropout": 0.0,
                },
            },
        }
    return out
