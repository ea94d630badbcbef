"""VQ-f4 autoencoder (ResShift's ``VQModelTorch``, the LDM vq-f4 first stage).

encode = quant_conv(encoder(x)), no quantisation; decode = decoder(post_quant_conv(quantize(z))).
Names reproduce ``keys_vqgan_f4.tsv``. The mid-block attention scales q before the q.k product
(upstream scales after; mathematically identical, and safer in FP16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltadiff.model.config import VQConfig


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - upstream name
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Normalize(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head global self-attention over all positions (N = h*w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2) * (C**-0.5)  # (B, N, C), pre-scaled
        k = self.k(h).reshape(B, C, H * W)  # (B, C, N)
        v = self.v(h).reshape(B, C, H * W)  # (B, C, N)
        w = torch.softmax(q @ k, dim=-1)  # (B, N_q, N_k)
        out = (v @ w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric zero pad (0, 1, 0, 1), then 3x3 conv stride 2, no padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (and ``attn``) lists plus an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, mults = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        res = cfg.resolution
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mults):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks):
                lvl.block.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if res in cfg.attn_resolutions:
                    lvl.attn.append(AttnBlock(cin))
            if i != len(mults) - 1:
                lvl.downsample = Downsample(cin)
                res //= 2
            self.down.append(lvl)
        self.mid = _Mid(cin)
        self.norm_out = Normalize(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, mults = cfg.ch, cfg.ch_mult
        cin = ch * mults[-1]
        res = cfg.resolution // 2 ** (len(mults) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin)
        up: list[_Level] = []
        for i in reversed(range(len(mults))):
            lvl = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                lvl.block.append(ResnetBlock(cin, ch * mults[i]))
                cin = ch * mults[i]
                if res in cfg.attn_resolutions:
                    lvl.attn.append(AttnBlock(cin))
            if i != 0:
                lvl.upsample = Upsample(cin)
                res *= 2
            up.insert(0, lvl)  # state-dict index = resolution level
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):  # execution order up.2 -> up.1 -> up.0
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup: argmin_k |z|^2 + |e_k|^2 - 2 z.e_k (an FP32 island in FP16 graphs)."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        B, C, H, W = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, C)  # (B*H*W, C), (b, h, w) order
        e = self.embedding.weight  # (K, C)
        d = (zf**2).sum(1, keepdim=True) + (e**2).sum(1)[None] - 2.0 * (zf @ e.t())  # (N, K)
        return torch.argmin(d, dim=1)  # (N,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, C, H, W = z.shape
        idx = self.indices(z)
        zq = self.embedding.weight[idx]  # (N, C)
        return zq.reshape(B, H, W, C).permute(0, 3, 1, 2)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B,3,H,W) in [-1,1] -> pre-quantisation latent (B,embed,H/4,W/4)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent -> image (unclamped). Quantisation is applied, as ResShift's decode does."""
        if quantize:
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))
