#!/usr/bin/env python
"""Build the evaluation corpus: x4 super-resolution pairs (HR crop + MATLAB-bicubic x1/4 LR) from
free-licensed photos, in fixed splits that are disjoint by source photo.

    python tools/build_corpus.py --out corpus/ [--shared-data DIR] [--check | --write-manifest]

Sources (no network except Debian packages, fetched with ``apt-get download``):

* Debian ``mate-backgrounds`` and ``plasma-workspace-wallpapers``: only the files marked as photos
  in ``tools/corpus/review.json`` (every image file of those packages and of ``gnome-backgrounds``
  / ``ukui-wallpapers`` was looked at; the latter two hold no photos);
* scikit-image's photos shipped inside the installed package (no downloads);
* optionally a shared data folder (``--shared-data``): ``hr-train/`` (the demo model's training
  images: calibration only) and ``val-bicubic-x4/gt`` (used by earlier calibrations: calibration
  and search only).

Every photo goes to one split (``train``, ``calibration``, ``search``, ``gate``, ``report``) by a
seeded shuffle per source; crops are cut at seeded, non-overlapping positions after a downscale
of big photos to a long side of at most 1920 px. Output: ``OUT/<split>/gt/NAME.png`` (HR) and
``OUT/<split>/lq/NAME.png`` (LR), plus ``OUT/manifest.json``. The committed manifest
(``tools/corpus/manifest.json``) records every crop with its pixel hashes; each build is compared
with it (``--check`` makes a difference an error). See docs/corpus.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deltadiff.errors import DeltaDiffError
from deltadiff.imresize import resize_matrix

HERE = Path(__file__).resolve().parent
REVIEW_PATH = HERE / "corpus" / "review.json"
MANIFEST_PATH = HERE / "corpus" / "manifest.json"
FORMAT = 1
SEED = 20261207
SCALE = 4
WORK_LONG_SIDE = 2560  # bigger photos are downscaled to this long side before cropping
# HR crops whose mean |luma gradient| (8-bit levels per pixel) is below this are skipped as flat
MIN_TEXTURE = 0.75
PLACEMENT_TRIES = 1000
SPLITS = ("train", "calibration", "search", "gate", "report")

Size = tuple[int, int]  # LR (height, width)
EVAL_PLAN: tuple[Size, ...] = ((128, 128), (96, 160), (160, 96)) * 3
TUNE_PLAN: tuple[Size, ...] = ((128, 128), (96, 160), (160, 96)) + ((64, 64),) * 4
TRAIN_PLAN: tuple[Size, ...] = ((128, 128),) * 12 + ((64, 64),) * 2
PLANS: dict[str, tuple[Size, ...]] = {
    "train": TRAIN_PLAN,
    "calibration": TUNE_PLAN,
    "search": TUNE_PLAN,
    "gate": EVAL_PLAN,
    "report": EVAL_PLAN,
}


class CorpusError(DeltaDiffError):
    """The corpus cannot be built or does not match the committed manifest."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    deb_sha256: str
    short: str  # id prefix of its photos


PACKAGES = (
    Package(
        "mate-backgrounds",
        "1.26.0-1",
        "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
        "mate",
    ),
    Package(
        "plasma-workspace-wallpapers",
        "4:5.27.5-2",
        "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
        "plasma",
    ),
)


@dataclass(frozen=True)
class SkimagePhoto:
    file: str  # inside skimage/data/
    func: str  # skimage.data function whose docstring states the license
    license: str
    phrase: str  # must appear in that docstring (else the license text changed: stop)


SKIMAGE_PHOTOS = {
    "astronaut": SkimagePhoto(
        "astronaut.png", "astronaut", "public domain (NASA)", "public domain"
    ),
    "camera": SkimagePhoto("camera.png", "camera", "CC0 (Lav Varshney)", "CC0"),
    "brick": SkimagePhoto("brick.png", "brick", "CC0 (CC0Textures)", "CC0"),
    "grass": SkimagePhoto("grass.png", "grass", "CC0 (DeviantArt linolafett)", "CC0"),
    "gravel": SkimagePhoto("gravel.png", "gravel", "CC0 (CC0Textures)", "CC0"),
    "ihc": SkimagePhoto(
        "ihc.png", "immunohistochemistry", "no known copyright restrictions", "No known copyright"
    ),
    "retina": SkimagePhoto("retina.jpg", "retina", "CC0 (Mikael Häggström)", "CC0"),
    "hubble": SkimagePhoto(
        "hubble_deep_field.jpg", "hubble_deep_field", "public domain (NASA)", "public domain"
    ),
    "rocket": SkimagePhoto("rocket.jpg", "rocket", "public domain (SpaceX)", "public domain"),
    "chelsea": SkimagePhoto("chelsea.png", "chelsea", "CC0 (Stefan van der Walt)", "CC0"),
    "coffee": SkimagePhoto("coffee.png", "coffee", "CC0 (Rachel Michetti)", "CC0"),
    "coins": SkimagePhoto(
        "coins.png", "coins", "no known copyright restrictions", "No known copyright"
    ),
}
# Left out: moon, page (no license stated), text (172 px high), stereo_motorcycle (Middlebury terms),
# cell / clock / horse / logo / color / phantom / chessboard (not photos or too small).

SHARED_LICENSE = "research benchmark image; see the original dataset terms"

# Photos per split, per source group: (split, count) in order; count -1 = all that are left.
# The evaluation splits come first so that they are never short of photos.
QUOTAS: dict[str, tuple[tuple[str, int], ...]] = {
    "mate": (("report", 4), ("gate", 4), ("search", 2), ("calibration", 1), ("train", -1)),
    "plasma": (("report", 4), ("gate", 4), ("search", 1), ("calibration", 1), ("train", -1)),
    # scikit-image photos that hold a 128x128-LR crop, then the small ones (64x64 crops only)
    "skimage-large": (
        ("report", 3),
        ("gate", 3),
        ("search", 1),
        ("calibration", 1),
        ("train", -1),
    ),
    "skimage-small": (("search", 1), ("calibration", 1), ("train", -1)),
    # shared data: the demo model trained on hr-train, so only calibration may use it
    "shared-drealsr": (("calibration", 16),),
    "shared-valx4": (("calibration", 8), ("search", -1)),
}
SKIMAGE_LARGE = ("astronaut", "camera", "brick", "grass", "gravel", "ihc", "retina", "hubble")
SKIMAGE_LARGE += ("rocket",)


@dataclass
class Photo:
    id: str
    source: str  # package name, "scikit-image" or "shared"
    origin: str  # package + version + path, skimage name + version, or shared file
    license: str
    copyright: str
    license_from: str  # where the license was read
    file_sha256: str
    pixels_sha256: str = ""
    size_hw: tuple[int, int] = (0, 0)
    scale: float = 1.0  # downscale before cropping (1 = none)
    work_hw: tuple[int, int] = (0, 0)
    split: str = ""
    data: bytes = field(default=b"", repr=False)


@dataclass
class Crop:
    name: str
    split: str
    photo: str
    source: str
    license: str
    box: tuple[int, int, int, int]  # HR crop (y, x, h, w) in the downscaled photo
    lr_hw: tuple[int, int]
    hr_hw: tuple[int, int]
    texture: float
    hr_sha256: str  # sha256 of the decoded pixels (H x W x 3 uint8, C order) of gt/NAME.png
    lr_sha256: str  # same for lq/NAME.png


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixels_sha256(arr: np.ndarray) -> str:
    """Hash of an image's pixels (PNG bytes differ between zlib builds; pixels do not)."""
    a = np.ascontiguousarray(arr, dtype=np.uint8)
    return sha256(f"{a.shape}".encode() + a.tobytes())


def stable_int(text: str) -> int:
    return int(sha256(text.encode())[:15], 16)


def rng_for(key: str, seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng([seed, stable_int(key)])


# ---------------------------------------------------------------- resize (MATLAB bicubic, float64)


def _taps(in_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The non-zero entries of the project's MATLAB-bicubic resize matrix, per output row."""
    m = resize_matrix(in_len, scale)
    counts = (m != 0).sum(axis=1)
    idx = np.zeros((m.shape[0], int(counts.max())), dtype=np.int64)
    w = np.zeros(idx.shape, dtype=np.float64)
    for r in range(m.shape[0]):
        cols = np.flatnonzero(m[r])
        idx[r, : cols.size] = cols
        w[r, : cols.size] = m[r, cols]
    return idx, w


def resize_f64(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` of an (H, W, C) array in float64: the weights of
    ``deltadiff.imresize.resize_matrix``, applied tap by tap (no BLAS, so bit-identical on every
    machine), height first, then width."""
    x = np.asarray(img, dtype=np.float64)
    idx, w = _taps(x.shape[0], scale)
    out = np.zeros((idx.shape[0], *x.shape[1:]), dtype=np.float64)
    for k in range(idx.shape[1]):
        out += w[:, k, None, None] * x[idx[:, k]]
    idx, w = _taps(x.shape[1], scale)
    res = np.zeros((out.shape[0], idx.shape[0], *x.shape[2:]), dtype=np.float64)
    for k in range(idx.shape[1]):
        res += w[None, :, k, None] * out[:, idx[:, k]]
    return res


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8: clip, x255, round half up (MATLAB ``im2uint8``)."""
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def downscale_u8(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB-bicubic resize of a uint8 (H, W, 3) image, rounded back to uint8."""
    return to_uint8(resize_f64(img.astype(np.float64) / 255.0, scale))


def lr_of(hr: np.ndarray) -> np.ndarray:
    """The LR image of an HR crop: MATLAB-bicubic x1/4, rounded to 8 bit."""
    if hr.shape[0] % SCALE or hr.shape[1] % SCALE:
        raise CorpusError(f"HR crop {hr.shape[:2]} is not a multiple of {SCALE}; fix the crop plan")
    return downscale_u8(hr, 1.0 / SCALE)


def work_scale(h: int, w: int, long_side: int = WORK_LONG_SIDE) -> float:
    """Downscale factor that brings a photo's long side to at most ``long_side``."""
    return min(1.0, long_side / max(h, w))


# ---------------------------------------------------------------- crops


class Texture:
    """Mean absolute luma gradient (BT.601, 8-bit levels per pixel) of any box of an image, from
    integral images of the vertical and horizontal gradients (one pass per photo)."""

    def __init__(self, img: np.ndarray) -> None:
        y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        self.gy = self._integral(np.abs(np.diff(y, axis=0)))
        self.gx = self._integral(np.abs(np.diff(y, axis=1)))

    @staticmethod
    def _integral(g: np.ndarray) -> np.ndarray:
        return np.pad(g.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))

    @staticmethod
    def _sum(s: np.ndarray, y: int, x: int, h: int, w: int) -> float:
        return float(s[y + h, x + w] - s[y, x + w] - s[y + h, x] + s[y, x])

    def __call__(self, y: int, x: int, h: int, w: int) -> float:
        vert = self._sum(self.gy, y, x, h - 1, w) / ((h - 1) * w)
        horiz = self._sum(self.gx, y, x, h, w - 1) / (h * (w - 1))
        return (vert + horiz) / 2


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def place_crops(
    img: np.ndarray, plan: tuple[Size, ...], rng: np.random.Generator
) -> list[tuple[tuple[int, int, int, int], float]]:
    """Seeded, non-overlapping HR boxes (y, x, h, w) for the LR sizes of ``plan`` that fit the
    image and are not flat; a size that finds no place in PLACEMENT_TRIES tries is skipped."""
    H, W = img.shape[:2]
    tex = Texture(img)
    boxes: list[tuple[tuple[int, int, int, int], float]] = []
    for lh, lw in plan:
        h, w = lh * SCALE, lw * SCALE
        if h > H or w > W:
            continue
        for _ in range(PLACEMENT_TRIES):
            box = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w)
            if any(_overlaps(box, b) for b, _ in boxes):
                continue
            t = tex(*box)
            if t >= MIN_TEXTURE:
                boxes.append((box, round(t, 3)))
                break
    return boxes


def assign_splits(ids: list[str], quotas: tuple[tuple[str, int], ...], key: str) -> dict[str, str]:
    """Seeded shuffle of ``ids`` (sorted first), then filled into the splits in quota order; ids
    beyond the quotas get no split (not used)."""
    order = sorted(ids)
    rng_for("split:" + key).shuffle(order)
    out: dict[str, str] = {}
    i = 0
    for split, n in quotas:
        take = order[i:] if n < 0 else order[i : i + n]
        out.update(dict.fromkeys(take, split))
        i += len(take)
    return out


# ---------------------------------------------------------------- Debian packages


def _find_deb(pkg: Package, debs: Path) -> Path | None:
    for p in sorted(debs.glob(f"{pkg.name}_*.deb")):
        if sha256(p.read_bytes()) == pkg.deb_sha256:
            return p
    return None


def fetch_deb(pkg: Package, debs: Path) -> Path:
    """The package's .deb from ``debs``, else ``apt-get download NAME=VERSION`` into it."""
    debs.mkdir(parents=True, exist_ok=True)
    found = _find_deb(pkg, debs)
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise CorpusError(
            f"{pkg.name} {pkg.version} .deb is not in {debs} and apt-get is missing; download "
            f"it from a Debian mirror into {debs}"
        )
    say(f"apt-get download {pkg.name}={pkg.version}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        res = subprocess.run(
            ["apt-get", "download", f"{pkg.name}={pkg.version}"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        got = sorted(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not got:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise CorpusError(
                f"apt-get download {pkg.name}={pkg.version} failed ({last}); run apt-get update "
                f"(as root), or put the .deb into {debs}"
            )
        digest = sha256(got[0].read_bytes())
        if digest != pkg.deb_sha256:
            raise CorpusError(
                f"{got[0].name} has sha256 {digest[:12]}..., the manifest's is "
                f"{pkg.deb_sha256[:12]}...; put the original .deb into {debs}"
            )
        dest = debs / got[0].name
        got[0].replace(dest)
    return dest


def read_deb_members(deb: Path, wanted: set[str]) -> dict[str, bytes]:
    """The named files (paths without the leading ./) of a .deb's data, via ``dpkg-deb``."""
    if shutil.which("dpkg-deb") is None:
        raise CorpusError("dpkg-deb is missing; install dpkg (Debian/Ubuntu) to unpack .deb files")
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    out: dict[str, bytes] = {}
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if name in wanted and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    out[name] = f.read()
    proc.stdout.close()
    if proc.wait() != 0:
        raise CorpusError(f"dpkg-deb cannot read {deb}; delete it so that it is downloaded again")
    missing = sorted(wanted - set(out))
    if missing:
        raise CorpusError(f"{deb.name} lacks {missing[0]} (and {len(missing) - 1} more)")
    return out


def dep5_license(copyright_text: str, path: str) -> tuple[str, str]:
    """(License, Copyright) of the last Files paragraph of a Debian copyright file that matches
    ``path`` (patterns are matched against every trailing part of the installed path)."""
    parts = path.split("/")
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    found = ("", "")
    for para in copyright_text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in para.splitlines():
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        pats = fields.get("Files", "").split()
        if any(fnmatch.fnmatchcase(t, p) for p in pats for t in tails):
            found = (fields.get("License", "").split(" ")[0], fields.get("Copyright", ""))
    return found


def _plasma_metadata(meta: bytes) -> tuple[str, str]:
    plugin = json.loads(meta)["KPlugin"]
    authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
    return plugin.get("License", ""), authors


def debian_photos(pkg: Package, review: dict, debs: Path) -> list[Photo]:
    entry = review["packages"][pkg.name]
    if entry["version"] != pkg.version:
        raise CorpusError(f"review.json reviewed {pkg.name} {entry['version']}, not {pkg.version}")
    paths = sorted(p for p, d in entry["files"].items() if d["photo"])
    doc = f"usr/share/doc/{pkg.name}/copyright"
    metas = {_wallpaper_dir(p) + "/metadata.json" for p in paths if "wallpapers/" in p}
    files = read_deb_members(fetch_deb(pkg, debs), {doc, *paths, *metas})
    text = files[doc].decode("utf-8", "replace")
    photos = []
    for p in paths:
        lic, holder = dep5_license(text, p)
        lic_from = doc
        meta = _wallpaper_dir(p) + "/metadata.json"
        if meta in files:
            up_lic, author = _plasma_metadata(files[meta])
            lic, holder = f"{lic} (Debian copyright); {up_lic} (metadata.json)", author or holder
            lic_from = f"{doc}; {meta}"
        name = _wallpaper_dir(p).rsplit("/", 1)[-1] if meta in files else Path(p).stem
        photos.append(
            Photo(
                id=f"{pkg.short}-{name.lower()}",
                source=pkg.name,
                origin=f"{pkg.name} {pkg.version}:{p}",
                license=lic,
                copyright=holder,
                license_from=lic_from,
                file_sha256=sha256(files[p]),
                data=files[p],
            )
        )
    return photos


def _wallpaper_dir(path: str) -> str:
    """usr/share/wallpapers/NAME/contents/images/F -> usr/share/wallpapers/NAME"""
    parts = path.split("/")
    return "/".join(parts[:4]) if "wallpapers" in parts else str(Path(path).parent)


# ---------------------------------------------------------------- scikit-image, shared data


def skimage_photos() -> tuple[list[Photo], str]:
    """scikit-image's bundled photos (files inside the installed package only)."""
    try:
        import skimage
        import skimage.data as skdata
    except ImportError:
        return [], "scikit-image is not installed (pip install scikit-image)"
    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for key, sp in SKIMAGE_PHOTOS.items():
        path = folder / sp.file
        if not path.is_file():
            return [], f"scikit-image {skimage.__version__} lacks data/{sp.file}"
        doc = getattr(skdata, sp.func).__doc__ or ""
        if sp.phrase.lower() not in doc.lower():
            raise CorpusError(
                f"skimage.data.{sp.func} no longer states '{sp.phrase}'; review its license"
            )
        data = path.read_bytes()
        photos.append(
            Photo(
                id=f"skimage-{key}",
                source="scikit-image",
                origin=f"scikit-image {skimage.__version__}:data/{sp.file}",
                license=sp.license,
                copyright="",
                license_from=f"skimage.data.{sp.func} docstring",
                file_sha256=sha256(data),
                data=data,
            )
        )
    return photos, ""


def shared_photos(folder: Path) -> list[Photo]:
    sets = (("hr-train", "drealsr_*.png", "drealsr"), ("val-bicubic-x4/gt", "*.png", "valx4"))
    photos = []
    for sub, pattern, short in sets:
        files = sorted((folder / sub).glob(pattern))
        if not files:
            raise CorpusError(
                f"--shared-data {folder} has no {sub}/{pattern}; pass the data folder"
            )
        for p in files:
            data = p.read_bytes()
            stem = p.stem.removeprefix("drealsr_")
            photos.append(
                Photo(
                    id=f"shared-{short}-{stem}",
                    source=f"shared:{sub.split('/')[0]}",
                    origin=f"shared data:{sub}/{p.name}",
                    license=SHARED_LICENSE,
                    copyright="",
                    license_from="shared data README.md",
                    file_sha256=sha256(data),
                    data=data,
                )
            )
    return photos


def quota_group(photo: Photo) -> str:
    if photo.source == "scikit-image":
        key = photo.id.removeprefix("skimage-")
        return "skimage-large" if key in SKIMAGE_LARGE else "skimage-small"
    if photo.source.startswith("shared"):
        return "shared-drealsr" if "-drealsr-" in photo.id else "shared-valx4"
    return photo.id.split("-")[0]


def assign_all(photos: list[Photo]) -> list[Photo]:
    """Split per photo (seeded per source group, so one group never moves another's photos)."""
    groups: dict[str, list[Photo]] = {}
    for ph in photos:
        groups.setdefault(quota_group(ph), []).append(ph)
    kept = []
    for g, members in sorted(groups.items()):
        splits = assign_splits([m.id for m in members], QUOTAS[g], g)
        for m in members:
            if m.id in splits:
                m.split = splits[m.id]
                kept.append(m)
    return kept


# ---------------------------------------------------------------- build


def decode(photo: Photo) -> np.ndarray:
    with Image.open(io.BytesIO(photo.data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG")


def cut_photo(photo: Photo, out: Path) -> list[Crop]:
    """Decode, downscale if big, cut the split's crops and write their gt/lq PNGs."""
    img = decode(photo)
    photo.size_hw = (int(img.shape[0]), int(img.shape[1]))
    photo.pixels_sha256 = pixels_sha256(img)
    photo.scale = work_scale(*photo.size_hw)
    if photo.scale < 1.0:
        img = downscale_u8(img, photo.scale)
    photo.work_hw = (int(img.shape[0]), int(img.shape[1]))
    if photo.split == "train":  # whole photos too: a trainer crops them at random
        save_png(out / "train" / "photos" / f"{photo.id}.png", img)
    crops = []
    for k, (box, tex) in enumerate(place_crops(img, PLANS[photo.split], rng_for(photo.id))):
        y, x, h, w = box
        hr = np.ascontiguousarray(img[y : y + h, x : x + w])
        lr = lr_of(hr)
        name = f"{photo.id}-w{w // SCALE}h{h // SCALE}-{k}"
        save_png(out / photo.split / "gt" / f"{name}.png", hr)
        save_png(out / photo.split / "lq" / f"{name}.png", lr)
        crops.append(
            Crop(
                name=name,
                split=photo.split,
                photo=photo.id,
                source=photo.source,
                license=photo.license,
                box=box,
                lr_hw=(h // SCALE, w // SCALE),
                hr_hw=(h, w),
                texture=tex,
                hr_sha256=pixels_sha256(hr),
                lr_sha256=pixels_sha256(lr),
            )
        )
    return crops


def gather_photos(debs: Path, shared: Path | None) -> tuple[list[Photo], list[str]]:
    """All source photos, and a line per source that is missing."""
    missing = []
    review = json.loads(REVIEW_PATH.read_text(encoding="utf-8"))
    photos = [ph for pkg in PACKAGES for ph in debian_photos(pkg, review, debs)]
    sk, why = skimage_photos()
    photos += sk
    if why:
        missing.append(f"scikit-image photos skipped: {why}")
    if shared is None:
        missing.append("shared data skipped (no --shared-data): hr-train and val-bicubic-x4 crops")
    else:
        photos += shared_photos(shared)
    return photos, missing


def build(out: Path, debs: Path, shared: Path | None) -> dict:
    """Build the corpus into ``out`` (replaced as a whole when complete); return its manifest."""
    photos, missing = gather_photos(debs, shared)
    photos = assign_all(photos)
    out.parent.mkdir(parents=True, exist_ok=True)
    crops: list[Crop] = []
    with _staging(out) as tmp:
        for split in SPLITS:
            for sub in ("gt", "lq"):
                (tmp / split / sub).mkdir(parents=True)
        (tmp / "train" / "photos").mkdir()
        for i, ph in enumerate(sorted(photos, key=lambda p: p.id)):
            crops += cut_photo(ph, tmp)
            if (i + 1) % 20 == 0:
                say(f"  {i + 1}/{len(photos)} photos, {len(crops)} crops")
        manifest = make_manifest(photos, crops, missing)
        (tmp / "manifest.json").write_text(dump_manifest(manifest), encoding="utf-8")
    return manifest


def check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier build (it holds manifest.json)."""
    if out.exists() and not out.is_dir():
        raise CorpusError(f"--out {out} is a file; pass a folder")
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise CorpusError(f"--out {out} is not empty and not a corpus; pass a new or empty folder")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temp folder beside ``out`` that replaces it (checked by ``check_out``) on success."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        old = out.parent / f"{tmp.name}.old"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- manifest


def counts(crops: list[Crop]) -> dict:
    by_split = Counter(c.split for c in crops)
    return {
        s: {
            "crops": by_split[s],
            "photos": len({c.photo for c in crops if c.split == s}),
            "by_source": dict(sorted(Counter(c.source for c in crops if c.split == s).items())),
            "by_lr_hw": dict(
                sorted(Counter(f"{c.lr_hw[0]}x{c.lr_hw[1]}" for c in crops if c.split == s).items())
            ),
        }
        for s in SPLITS
    }


def make_manifest(photos: list[Photo], crops: list[Crop], missing: list[str]) -> dict:
    review = json.loads(REVIEW_PATH.read_text(encoding="utf-8"))
    reviewed = {
        name: {
            "version": e["version"],
            "photos": sorted(p for p, d in e["files"].items() if d["photo"]),
            "rejected": {p: d["reason"] for p, d in sorted(e["files"].items()) if not d["photo"]},
        }
        for name, e in review["packages"].items()
    }
    photo_rows = []
    for p in sorted(photos, key=lambda p: p.id):
        row = asdict(p)
        row.pop("data")
        photo_rows.append(row)
    return {
        "format": FORMAT,
        "tool": "tools/build_corpus.py",
        "seed": SEED,
        "scale": SCALE,
        "work_long_side": WORK_LONG_SIDE,
        "min_texture": MIN_TEXTURE,
        "hash_note": "hr_sha256 / lr_sha256 / pixels_sha256: sha256 of the decoded pixels",
        "missing_sources": missing,
        "packages": {p.name: {"version": p.version, "deb_sha256": p.deb_sha256} for p in PACKAGES},
        "review": reviewed,
        "counts": counts(crops),
        "photos": photo_rows,
        "crops": [asdict(c) for c in sorted(crops, key=lambda c: (SPLITS.index(c.split), c.name))],
    }


def dump_manifest(m: dict) -> str:
    """JSON with one photo / crop per line (diffable, compact)."""
    head = {k: v for k, v in m.items() if k not in ("photos", "crops")}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    for key in ("photos", "crops"):
        rows = ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in m[key])
        text += f',\n "{key}": [\n  {rows}\n ]'
    return text + "\n}\n"


def compare(built: dict, committed: dict) -> tuple[list[str], int]:
    """Differences between a build and the committed manifest (crops of sources this build did
    not have are not compared); also the number of committed crops that were skipped."""
    keys = ("split", "photo", "box", "lr_hw", "hr_sha256", "lr_sha256")
    have = {c["name"]: c for c in built["crops"]}
    built_sources = {p["source"] for p in built["photos"]}
    problems, skipped = [], 0
    for c in committed["crops"]:
        got = have.pop(c["name"], None)
        if got is None:
            if c["source"] in built_sources:
                problems.append(f"{c['name']}: in the manifest, not built")
            else:
                skipped += 1
            continue
        bad = [k for k in keys if json.loads(json.dumps(got[k])) != c[k]]
        if bad:
            problems.append(f"{c['name']}: {', '.join(bad)} differ")
    problems += [f"{n}: built, not in the manifest" for n in sorted(have)]
    return problems, skipped


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="corpus folder to (re)create")
    ap.add_argument("--shared-data", type=Path, help="folder with hr-train/ and val-bicubic-x4/")
    ap.add_argument(
        "--debs",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltadiff-debs",
        help="where the .deb files are kept (downloaded with apt-get download when missing)",
    )
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the build differs")
    mode.add_argument("--write-manifest", action="store_true", help=f"rewrite {MANIFEST_PATH.name}")
    return ap.parse_args(argv)


def summary(m: dict) -> None:
    for split, c in m["counts"].items():
        srcs = ", ".join(f"{k} {v}" for k, v in c["by_source"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in c["by_lr_hw"].items())
        say(f"{split:12s} {c['crops']:4d} crops from {c['photos']:3d} photos | {srcs} | LR {sizes}")
    for line in m["missing_sources"]:
        say(f"NOTE: {line}")


def run(args: argparse.Namespace) -> int:
    shared = args.shared_data
    if shared is not None and not shared.is_dir():
        raise CorpusError(f"--shared-data {shared} is not a folder; pass the shared data folder")
    if args.write_manifest and shared is None:
        raise CorpusError("--write-manifest needs --shared-data (the manifest lists its crops too)")
    check_out(args.out)
    t0 = time.perf_counter()
    m = build(args.out, args.debs, shared)
    say(f"built {len(m['crops'])} crops in {args.out} in {time.perf_counter() - t0:.0f} s")
    summary(m)
    if args.write_manifest:
        MANIFEST_PATH.write_text(dump_manifest(m), encoding="utf-8")
        say(f"wrote {MANIFEST_PATH}")
        return 0
    if not MANIFEST_PATH.is_file():
        raise CorpusError(f"{MANIFEST_PATH} is missing; restore it (git checkout) to compare")
    problems, skipped = compare(m, json.loads(MANIFEST_PATH.read_text(encoding="utf-8")))
    for p in problems[:20]:
        say(f"DIFF {p}")
    verdict = "matches" if not problems else f"differs in {len(problems)} crops from"
    say(f"build {verdict} {MANIFEST_PATH.name} ({skipped} crops of missing sources not compared)")
    return 1 if problems and args.check else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except DeltaDiffError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: {exc.strerror or exc}: {exc.filename}; check the paths\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
