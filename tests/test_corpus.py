"""The evaluation corpus: the committed manifest (splits, counts, sizes, licenses) and the crop /
resize functions of tools/build_corpus.py. Fast, no network, no corpus images needed."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from deltadiff.imresize import imresize_matlab, resize_matrix

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "build_corpus.py"
EVAL_SPLITS = ("gate", "report")


def _load_script():
    # tools/ is a folder of lab scripts, not a package: load the file by path
    spec = importlib.util.spec_from_file_location("build_corpus", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


bc = _load_script()


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(bc.MANIFEST_PATH.read_text(encoding="utf-8"))


def test_splits_are_disjoint_by_photo_and_crop(manifest):
    split_of_photo = {p["id"]: p["split"] for p in manifest["photos"]}
    assert len(split_of_photo) == len(manifest["photos"])
    seen: dict[str, set[str]] = defaultdict(set)
    for c in manifest["crops"]:
        seen[c["photo"]].add(c["split"])
        assert c["split"] == split_of_photo[c["photo"]]
    assert all(len(s) == 1 for s in seen.values())
    names = [c["name"] for c in manifest["crops"]]
    assert len(names) == len(set(names))
    hashes = [c["hr_sha256"] for c in manifest["crops"]]
    assert len(hashes) == len(set(hashes)), "two crops have the same HR pixels"
    # the same photo file never appears under two ids (e.g. a wallpaper in two packages)
    files = [p["file_sha256"] for p in manifest["photos"]]
    assert len(files) == len(set(files))


def test_eval_splits_size_and_sources(manifest):
    for split in EVAL_SPLITS:
        crops = [c for c in manifest["crops"] if c["split"] == split]
        assert 48 <= len(crops) <= 64, (split, len(crops))
        sources = {c["source"] for c in crops}
        assert len(sources) >= 3, (split, sources)
        assert not any(s.startswith("shared") for s in sources), "shared data is not held out"


def test_shared_data_stays_on_the_tuning_side(manifest):
    for c in manifest["crops"]:
        if c["source"] == "shared:hr-train":
            assert c["split"] in ("train", "calibration")
        if c["source"] == "shared:val-bicubic-x4":
            assert c["split"] in ("calibration", "search")


def test_lr_sizes(manifest):
    sizes = defaultdict(set)
    for c in manifest["crops"]:
        assert c["hr_hw"] == [4 * c["lr_hw"][0], 4 * c["lr_hw"][1]]
        assert c["box"][2:] == c["hr_hw"]
        sizes[c["split"]].add(tuple(c["lr_hw"]))
    everything = set().union(*sizes.values())
    assert {(64, 64), (128, 128)} <= everything
    assert {(96, 160), (160, 96)} & everything
    for split in EVAL_SPLITS:  # the sizes dd-run upscale runs whole
        assert all(h * w >= 96 * 160 for h, w in sizes[split]), sizes[split]
        assert (128, 128) in sizes[split]
    for split in ("calibration", "search"):
        assert (64, 64) in sizes[split] and len(sizes[split]) >= 3, sizes[split]


def test_crops_lie_inside_their_photo_without_overlap(manifest):
    photos = {p["id"]: p for p in manifest["photos"]}
    boxes = defaultdict(list)
    for c in manifest["crops"]:
        y, x, h, w = c["box"]
        H, W = photos[c["photo"]]["work_hw"]
        assert y >= 0 and x >= 0 and y + h <= H and x + w <= W, c["name"]
        assert c["texture"] >= manifest["min_texture"]
        boxes[c["photo"]].append(tuple(c["box"]))
    for bs in boxes.values():
        for i, a in enumerate(bs):
            assert not any(bc._overlaps(a, b) for b in bs[i + 1 :])


def test_every_record_has_origin_and_license(manifest):
    photos = {p["id"]: p for p in manifest["photos"]}
    for p in manifest["photos"]:
        assert p["license"] and p["license_from"] and p["origin"], p["id"]
        assert len(p["file_sha256"]) == 64 and len(p["pixels_sha256"]) == 64
    for c in manifest["crops"]:
        assert c["license"] == photos[c["photo"]]["license"], c["name"]
        assert len(c["hr_sha256"]) == 64 and len(c["lr_sha256"]) == 64


def test_debian_photos_are_the_reviewed_ones(manifest):
    review = json.loads(bc.REVIEW_PATH.read_text(encoding="utf-8"))
    marked = {
        f"{name} {e['version']}:{path}"
        for name, e in review["packages"].items()
        for path, d in e["files"].items()
        if d["photo"]
    }
    used = {p["origin"] for p in manifest["photos"] if p["source"] in review["packages"]}
    assert used == marked
    for name, e in review["packages"].items():
        assert all(d["reason"] for d in e["files"].values()), name


def test_lr_is_matlab_imresize_of_hr():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    hr[:, 40:] = np.clip(hr[:, 40:] // 4 + 100, 0, 255)  # some smoother content too
    lr = bc.lr_of(hr)
    assert lr.shape == (16, 24, 3) and lr.dtype == np.uint8
    ref = imresize_matlab(hr.astype(np.float64) / 255.0, 0.25) * 255.0
    np.testing.assert_array_equal(lr, np.floor(np.clip(ref, 0, 255) + 0.5).astype(np.uint8))
    # the float64 tap-by-tap resize equals the dense MATLAB matrices to rounding error
    x = hr.astype(np.float64)
    dense = np.einsum("ij,jkc->ikc", resize_matrix(64, 0.25), x)
    dense = np.einsum("kj,ijc->ikc", resize_matrix(96, 0.25), dense)
    np.testing.assert_allclose(bc.resize_f64(x, 0.25), dense, rtol=0, atol=1e-9)


def test_downscale_of_big_photos():
    assert bc.work_scale(1600, 2560) == 1.0
    assert bc.work_scale(2880, 5120) == 0.5
    img = np.full((40, 60, 3), 77, dtype=np.uint8)
    small = bc.downscale_u8(img, 0.5)
    assert small.shape == (20, 30, 3) and np.all(small == 77)


def test_crop_positions_are_seeded():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(900, 1300, 3), dtype=np.uint8)
    a = bc.place_crops(img, bc.EVAL_PLAN, bc.rng_for("photo-a"))
    b = bc.place_crops(img, bc.EVAL_PLAN, bc.rng_for("photo-a"))
    c = bc.place_crops(img, bc.EVAL_PLAN, bc.rng_for("photo-b"))
    assert a == b and a != c and len(a) >= 2
    for i, (box, _) in enumerate(a):
        assert box[0] + box[2] <= 900 and box[1] + box[3] <= 1300
        assert not any(bc._overlaps(box, o) for o, _ in a[i + 1 :])
    flat = np.zeros((600, 600, 3), dtype=np.uint8)
    assert bc.place_crops(flat, bc.EVAL_PLAN, bc.rng_for("flat")) == []


def test_texture_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    y = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    sub = y[5:37, 9:57]
    direct = (np.abs(np.diff(sub, axis=0)).mean() + np.abs(np.diff(sub, axis=1)).mean()) / 2
    assert bc.Texture(img)(5, 9, 32, 48) == pytest.approx(direct, rel=1e-9)


def test_split_assignment_is_seeded_and_follows_quotas():
    ids = [f"p{i}" for i in range(10)]
    quotas = (("report", 3), ("gate", 3), ("train", -1))
    a = bc.assign_splits(ids, quotas, "k")
    assert a == bc.assign_splits(list(reversed(ids)), quotas, "k")
    got = defaultdict(int)
    for s in a.values():
        got[s] += 1
    assert dict(got) == {"report": 3, "gate": 3, "train": 4}
    assert len(bc.assign_splits(ids, (("calibration", 4),), "k")) == 4  # the rest: unused


def test_debian_copyright_lookup():
    text = (
        "Format: x\n\nFiles: *\nCopyright: 2014 Group\nLicense: GPL-2+\n\n"
        "Files: nature/Aqua.jpg\n       nature/Dune.jpg\nCopyright: 2008, A\nLicense: CC-BY-SA-4.0\n"
    )
    assert bc.dep5_license(text, "usr/share/backgrounds/mate/nature/Dune.jpg") == (
        "CC-BY-SA-4.0",
        "2008, A",
    )
    assert bc.dep5_license(text, "usr/share/x/other.jpg") == ("GPL-2+", "2014 Group")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert bc.main(["--out", str(tmp_path / "c"), "--shared-data", str(tmp_path / "no")]) == 2
    assert bc.main(["--out", str(tmp_path / "c"), "--write-manifest"]) == 2
    (tmp_path / "file").write_text("x")
    assert bc.main(["--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: --") for e in err), err


def test_compare_reports_differences_and_skips_missing_sources():
    def crop(name, source, lr="a"):
        return {"name": name, "source": source, "split": "gate", "photo": name, "box": [0, 0, 4, 4],
                "lr_hw": [1, 1], "hr_sha256": "h", "lr_sha256": lr}  # fmt: skip

    committed = {"crops": [crop("a", "mate"), crop("b", "mate"), crop("s", "shared:hr-train")]}
    built = {
        "photos": [{"source": "mate"}],
        "crops": [crop("a", "mate", lr="x"), crop("c", "mate")],
    }
    problems, skipped = bc.compare(built, committed)
    assert skipped == 1
    assert problems == [
        "a: lr_sha256 differ",
        "b: in the manifest, not built",
        "c: built, not in the manifest",
    ]
    same = {"photos": [{"source": "mate"}], "crops": committed["crops"][:2]}
    assert bc.compare(same, committed) == ([], 1)
