"""Calibration images: load, split into calibration / held-out, and run them through the FP32
graphs to get the step graph's inputs at every row (the FP32 trajectories, cached in memory).

``--data DIR`` is either a folder of LR images (what the model will be asked to upscale) or a
paired x4 set with ``gt/`` + ``lq/`` (then the held-out pairs also give PSNR-Y vs HR). The first
``samples`` images (spread evenly over the sorted list) calibrate; the rest are held out for the
gate, so the gate never sees a calibration image.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltadiff.errors import DeltaDiffError, ImageError
from deltadiff.manifest import Manifest
from deltadiff.noise import noise_field
from deltadiff.runtime.backends.ort import OrtBackend
from deltadiff.runtime.executor import Executor
from deltadiff.runtime.imageio import read_image
from deltadiff.steps import StepRow
from deltadiff.tiling import reflect_pad

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MIN_HELD_OUT = 2


class CalibrationDataError(DeltaDiffError):
    """The calibration images cannot be used (missing, unreadable, too few)."""


@dataclass
class Image:
    name: str
    lr: np.ndarray  # (3, h, w) float32 in [0, 1]
    hr: np.ndarray | None = None  # (H, W, 3) uint8 when the set is paired
    sha256: str = ""


@dataclass
class ImageSet:
    folder: Path
    calib: list[Image]
    held_out: list[Image]
    paired: bool

    @property
    def sha256(self) -> str:
        """Hash over the calibration images' file hashes (recorded in the manifest)."""
        h = hashlib.sha256()
        for im in self.calib:
            h.update(im.sha256.encode())
        return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read(path: Path) -> Image:
    try:
        data = path.read_bytes()
        rgb = read_image(path).rgb  # (h, w, 3) float32
    except (OSError, ImageError) as exc:
        raise CalibrationDataError(
            f"calibration image {path} is unreadable ({exc}); remove or replace it"
        ) from None
    return Image(
        path.stem,
        np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def load_images(folder: str | Path, samples: int) -> ImageSet:
    """Read ``folder`` and split it: ``samples`` calibration images, the rest held out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationDataError(
            f"--data {folder} is not a folder; pass a folder of LR images (or gt/ + lq/ pairs)"
        )
    paired = (folder / "gt").is_dir() and (folder / "lq").is_dir()
    lq_dir = folder / "lq" if paired else folder
    paths = _files(lq_dir)
    if not paths:
        raise CalibrationDataError(
            f"--data {folder} has no images (png/jpg/webp/bmp/tiff); add LR images to calibrate on"
        )
    if samples < 1:
        raise CalibrationDataError(f"--samples {samples}: need at least 1 calibration image")
    need = samples + MIN_HELD_OUT
    if len(paths) < need:
        raise CalibrationDataError(
            f"--data {folder} has {len(paths)} images; --samples {samples} needs at least {need} "
            f"({MIN_HELD_OUT} are held out for the gate): add images or lower --samples"
        )
    images = [_read(p) for p in paths]
    if paired:
        for im, p in zip(images, paths, strict=True):
            gt = next((q for q in _files(folder / "gt") if q.stem == p.stem), None)
            if gt is None:
                raise CalibrationDataError(
                    f"{p.name} in {lq_dir} has no HR partner in {folder / 'gt'}; add it or remove it"
                )
            hr = np.asarray(read_image(gt).rgb)
            hr8 = np.floor(np.clip(hr, 0, 1) * 255.0 + 0.5).astype(np.uint8)
            if hr8.shape[:2] != (4 * im.lr.shape[1], 4 * im.lr.shape[2]):
                raise CalibrationDataError(
                    f"{gt.name}: HR is not 4x the LR size of {p.name}; fix the pair"
                )
            im.hr = hr8
    idx = sorted({int(round(i)) for i in np.linspace(0, len(images) - 1, samples)})
    calib = [images[i] for i in idx]
    held = [im for i, im in enumerate(images) if i not in idx]
    log.info(
        "%d calibration images, %d held out for the gate (%s)",
        len(calib),
        len(held),
        "paired with HR" if paired else "LR only",
    )
    return ImageSet(folder, calib, held, paired)


def tiles(m: Manifest, images: list[Image]) -> np.ndarray:
    """One LR tile per image, (N, 3, th, tw): reflect-padded at the bottom/right like the
    upscaler pads a small image, or centre-cropped when the image is larger than the tile."""
    th, tw = m.tile
    out = []
    for im in images:
        a = reflect_pad(im.lr, max(0, th - im.lr.shape[1]), max(0, tw - im.lr.shape[2]))
        y0, x0 = (a.shape[1] - th) // 2, (a.shape[2] - tw) // 2
        out.append(a[:, y0 : y0 + th, x0 : x0 + tw])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


@dataclass
class Trajectory:
    """The FP32 chain of a batch of tiles: the step inputs at every row and the output."""

    lr: np.ndarray
    x: dict[int, np.ndarray]  # row t -> the state fed to that row
    x_out: dict[int, np.ndarray]  # row t -> that row's output state
    y: np.ndarray
    cond: np.ndarray
    noise: dict[str, np.ndarray]
    image: np.ndarray  # FP32 output (N, 3, 4h, 4w)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def feeds(self, m: Manifest, row: StepRow, step_inputs: list[str]) -> dict[str, np.ndarray]:
        t = row.t
        f = {
            "x": self.x[t],
            "y": self.y,
            "cond": self.cond,
            "t": row.t_input(),
            "coef": row.coef(),
        }
        if "noise" in step_inputs:
            f["noise"] = (
                self.noise[row.noise] if row.noise in self.noise else np.zeros_like(self.x[t])
            )
        return f


def fp32_trajectory(
    model_dir: Path, m: Manifest, lr: np.ndarray, *, threads: int = 0, seed: int = 0
) -> Trajectory:
    """Run the FP32 staged chain once and keep every row's input state."""
    B = lr.shape[0]
    sh, sw = m.state_hw()
    noise = noise_field(m.noise_names, (B, 3, sh, sw), seed + 1)
    trace: dict[str, np.ndarray] = {}
    with OrtBackend(model_dir, m, precision="fp32", threads=threads) as be:
        image = Executor(m, be, mode="staged").run(lr, noise, trace=trace)
    xs, outs = {}, {}
    x = trace["x_T"]
    for r in m.step_table.rows:
        t = r.t
        xs[t] = x
        x = outs[t] = trace[f"x_{t - 1}"]
    return Trajectory(lr, xs, outs, trace["y"], trace["cond"], noise, image)
