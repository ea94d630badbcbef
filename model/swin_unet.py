"""Swin-UNet (``UNetModelSwin``) with upstream semantics.

Built bottom-up: norms and embeddings, ResBlock, Swin pieces, then the UNet. Module and parameter
names reproduce the upstream state dicts (``keys_deltadiff_unet.tsv``, ``keys_resshift_unet.tsv``).
Inference only; one forward path. The shifted-window mask is built with tensor ops from the runtime
feature size (``shift_mask_like``), so a static export folds it to a constant and a dynamic export
(symbolic H, W) computes it in the graph. The window/shift clamp is decided from the config at
construction, never from the runtime size.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deltadiff.model.config import UNetConfig

# Names of state-dict entries that are ignored when loading (buffers upstream recomputes).
IGNORED_BUFFER_SUFFIXES: tuple[str, ...] = ("attn_mask",)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the input dtype (an FP32 island)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)  # eps 1e-5


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, **cos first** (as upstream); t: (B,) int -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM (scale first, then shift), GN-SiLU-conv, plus skip (as upstream)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]  # (B, 2C, 1, 1)
        scale, shift = torch.chunk(e, 2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = norm(h) * (1 + scale) + shift
        h = rest(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------- Swin


def relative_position_index(window: int) -> torch.Tensor:
    """index[i, j] = (h_i - h_j + w-1) * (2w-1) + (w_i - w_j + w-1), row-major tokens (§2.2)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N)
    return (rel[0] * (2 * window - 1) + rel[1]).long()


@lru_cache(maxsize=64)
def _upstream_shift_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """The mask upstream actually adds in shifted blocks (in closed form).

    Only the last row of windows is masked: token pairs get -100 when exactly one of them has an
    in-window column >= window - shift. Shape (nW, N, N), nW row-major over the window grid.
    Built in numpy so that tracing records a constant, not the construction.
    """
    n_h, n_w = h // window, w // window
    n = window * window
    side = (np.arange(n) % window) >= (window - shift)
    pair = (side[:, None] ^ side[None, :]).astype(np.float32) * np.float32(-100.0)  # (N, N)
    mask = np.zeros((n_h, n_w, n, n), dtype=np.float32)
    mask[n_h - 1] = pair
    mask.setflags(write=False)
    return mask.reshape(n_h * n_w, n, n)


def shift_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """Upstream shifted-window mask for an (h, w) feature map; a constant per shape."""
    return torch.from_numpy(_upstream_shift_mask(h, w, window, shift).copy())


def shift_mask_like(x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """The same mask as ``shift_mask(H, W, window, shift)``, from tensor ops on x's (H, W).

    Exportable with symbolic H, W (docs/dynamic-shapes.md): window-row r, in-window column j,
    y = r*window + j; region = (y >= H - window) + (y >= H - shift); -100 where the regions of
    the two tokens differ (only the last window row can differ), repeated over window columns.
    """
    H, W = x.shape[-2], x.shape[-1]
    n_h, n_w, n = H // window, W // window, window * window
    r = torch.arange(n_h, device=x.device)[:, None]  # (n_h, 1)
    j = torch.arange(n, device=x.device)[None, :] % window  # (1, N)
    y = r * window + j  # (n_h, N)
    region = (y >= H - window).to(torch.int64) + (y >= H - shift).to(torch.int64)
    differ = region[:, :, None] != region[:, None, :]  # (n_h, N, N)
    mask = differ.to(torch.float32) * -100.0
    return mask[:, None].expand(n_h, n_w, n, n).reshape(n_h * n_w, n, n)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        Bw, N, C = x.shape  # (B*nW, N, C)
        hd = C // self.heads
        qkv = self.qkv(x).reshape(Bw, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # (3,Bw,h,N,hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (Bw, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(N, N, self.heads).permute(2, 0, 1)  # (heads, N, N)
        attn = attn + bias[None].to(attn.dtype)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.reshape(Bw // nW, nW, self.heads, N, N) + mask[None, :, None].to(attn.dtype)
            attn = attn.reshape(Bw, self.heads, N, N)
        attn = torch.softmax(attn, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(Bw, N, C)  # (Bw, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """1x1 conv MLP on NCHW, exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Swin block on NCHW with GroupNorm norms (upstream order)."""

    def __init__(
        self, dim: int, heads: int, window: int, shift: int, mlp_ratio: int, resolution: int
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = normalization(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = normalization(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        if shift > 0:
            # Upstream stores the mask for the configured resolution but never uses it (a list vs
            # tuple comparison always fails, §2.5); kept only so state dicts match upstream.
            # forward() recomputes the mask for the runtime size, as upstream does.
            self.register_buffer("attn_mask", shift_mask(resolution, resolution, window, shift))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ws, s = self.window, self.shift
        h = self.norm1(x)
        if s > 0:
            h = torch.roll(h, shifts=(-s, -s), dims=(2, 3))
        # window partition: (B, C, H/ws, ws, W/ws, ws) -> (B, H/ws, W/ws, ws, ws, C) -> (B*nW, N, C)
        h = h.reshape(B, C, H // ws, ws, W // ws, ws).permute(0, 2, 4, 3, 5, 1)
        h = h.reshape(-1, ws * ws, C)
        mask = shift_mask_like(x, ws, s) if s > 0 else None
        h = self.attn(h, mask)
        # window reverse: (B*nW, N, C) -> (B, H/ws, W/ws, ws, ws, C) -> (B, C, H, W)
        h = h.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 5, 1, 3, 2, 4)
        h = h.reshape(B, C, H, W)
        if s > 0:
            h = torch.roll(h, shifts=(s, s), dims=(2, 3))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchProj(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """patch_embed (1x1) -> depth Swin blocks -> patch_unembed (1x1); no outer residual."""

    def __init__(self, in_ch: int, cfg: UNetConfig, resolution: int) -> None:
        super().__init__()
        window = cfg.window_size
        shift = window // 2
        if resolution <= window:  # upstream clamps window to the configured resolution, no shift
            window, shift = resolution, 0
        self.patch_embed = PatchProj(in_ch, cfg.swin_embed_dim)
        self.patch_unembed = PatchProj(cfg.swin_embed_dim, in_ch)  # registered here: upstream order
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                cfg.swin_embed_dim,
                cfg.swin_heads(),
                window,
                0 if i % 2 == 0 else shift,
                cfg.mlp_ratio,
                resolution,
            )
            for i in range(cfg.swin_depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.patch_unembed(x)


class TimestepSequential(nn.Sequential):
    """Sequential whose ResBlocks receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# ----------------------------------------------------------------------------- UNet


class SwinUNet(nn.Module):
    """``UNetModelSwin``: x0 = UNet(cat[x_scaled, cond], t). Input (B, 3, H, W) each."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def swin_here(ds: int) -> bool:
            return cfg.image_size // ds in cfg.attention_resolutions

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(cfg.in_channels + 3, mc, 3, padding=1))]
        )
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, mult * mc)]
                ch = mult * mc
                if i == 0 and swin_here(ds):
                    layers.append(BasicLayer(ch, cfg, cfg.image_size // ds))
                self.input_blocks.append(TimestepSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(
            ResBlock(ch, emb_ch, ch),
            BasicLayer(ch, cfg, cfg.image_size // ds),
            ResBlock(ch, emb_ch, ch),
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks[level] + 1):
                skip = chans.pop()
                layers = [ResBlock(ch + skip, emb_ch, mc * mult)]
                ch = mc * mult
                if i == 0 and swin_here(ds):
                    layers.append(BasicLayer(ch, cfg, cfg.image_size // ds))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: scaled state (B,3,H,W); t: (B,) int64; cond: (B,3,H,W), unscaled."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        h = torch.cat([x, cond], dim=1)
        hs = []
        for blk in self.input_blocks:
            h = blk(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
