"""Conformance checker for golden folders (layout of ``tests/golden``; its README is the format).

    python -m deltadiff.model.golden DIR [--verbose]

Every case folder found under DIR is recognised by the arrays it holds, run through the project's
own configs (upstream YAML) and checkpoint loader, and compared at the tolerances the golden
README suggests. One line per output; exit status 0 only if every output passes and at least one
case was found. Sizes come from the arrays and configs, never from constants, so folders with
other seeds and non-square sizes are checked by the same code.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deltadiff.compare import CompareResult, compare, compare_equal
from deltadiff.errors import DeltaDiffError
from deltadiff.imresize import imresize_matlab, resize_matrix
from deltadiff.model.bicubic_x4 import BicubicUp4
from deltadiff.model.checkpoint import load_weights_into
from deltadiff.model.config import from_upstream_yaml, load_yaml, unet_from_params, vq_from_params
from deltadiff.model.schedule import etas, make_step_table, sqrt_etas
from deltadiff.model.swin_unet import SwinUNet, shift_mask
from deltadiff.model.vq_f4 import VQModel

# Suggested tolerances (golden README, "Suggested tolerances"); intermediates at 1e-6.
TOL = {
    "bicubic": 1e-6,
    "unet": 1e-4,
    "loop": (1e-4, 2e-4, 5e-4, 1e-3),  # x0_hat per step, t = 3, 2, 1, 0
    "vq_encode": 5e-5,
    "vq_decode": 2e-4,
    "step": 1e-4,
    "intermediate": 1e-6,
    "table": 1e-9,
}

Results = list[CompareResult]


def _npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, with the file closed again."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _hwc_to_nchw(a: np.ndarray) -> torch.Tensor:
    return _t(a).permute(2, 0, 1)[None]


def _nchw_to_hwc(t: torch.Tensor) -> np.ndarray:
    return t[0].permute(1, 2, 0).numpy()


def _ckpt(case: Path, section: dict) -> Path:
    p = section.get("ckpt_path")
    if not p:
        raise DeltaDiffError(f"{case}/config.yaml: section has no ckpt_path")
    return (case / str(p)).resolve()


def _load_unet(case: Path, data: dict) -> SwinUNet:
    unet = SwinUNet(unet_from_params(data["model"]["params"]))
    load_weights_into(
        unet, _ckpt(case, data["model"]), what="UNet", config_desc=f"{case.name}/config.yaml"
    )
    return unet.eval()


def _load_vq(case: Path, data: dict) -> VQModel:
    vq = VQModel(vq_from_params(data["autoencoder"]["params"]))
    load_weights_into(
        vq, _ckpt(case, data["autoencoder"]), what="VQ-f4", config_desc=f"{case.name}/config.yaml"
    )
    return vq.eval()


# ----------------------------------------------------------------------------- cases


def check_bicubic(case: Path, npz: Path) -> Results:
    g = _npz(npz)
    gold = (
        (load_yaml(case / "config.yaml").get("golden") or {})
        if (case / "config.yaml").exists()
        else {}
    )
    scale_up = float((gold.get("up") or {}).get("scale", 4.0))
    scale_down = float((gold.get("down") or {}).get("scale", 0.25))
    odd = gold.get("odd_down") or {}
    tol = TOL["bicubic"]
    res: Results = []
    up4 = BicubicUp4("matlab")
    pairs = [
        ("up_input_hwc", "up_x4_output_hwc", scale_up),
        ("down_input_hwc", "down_x025_output_hwc", scale_down),
        ("down_input_hwc", "roundtrip_lq_hwc", scale_down),
        ("roundtrip_lq_hwc", "roundtrip_lq_up_hwc", 1.0 / scale_down),
        ("odd_input_hwc", "odd_x025_output_hwc", float(odd.get("scale", 0.25))),
        (
            "odd_x025_output_hwc",
            "odd_x025_then_x4_output_hwc",
            float(odd.get("then_up_scale", 4.0)),
        ),
    ]
    for src, dst, scale in pairs:
        if src not in g or dst not in g:
            continue
        res.append(compare(g[dst], imresize_matlab(g[src], scale), name=f"{dst} (numpy)", atol=tol))
        if scale == 4.0:  # the exported 4-phase filter must agree too
            with torch.no_grad():
                out = _nchw_to_hwc(up4(_hwc_to_nchw(g[src])))
            res.append(compare(g[dst], out, name=f"{dst} (4-phase graph)", atol=tol))
    # upstream's per-pixel taps (weights on the symmetrically padded axis), folded into a dense
    # resampling matrix and compared with ours
    for which, src in (("up", "up_input_hwc"), ("down", "down_input_hwc")):
        for ax, axis in (("H", 0), ("W", 1)):
            keys = [f"{which}_{k}_{ax}" for k in ("weights", "indices", "sym_len")]
            if not all(k in g for k in keys) or src not in g:
                continue
            n = g[src].shape[axis]
            w, idx, sym = g[keys[0]].astype(np.float64), g[keys[1]], g[keys[2]]
            orig = idx.astype(np.int64) - int(sym[0])  # padded -> original 0-based position
            orig = np.where(orig < 0, -orig - 1, orig)
            orig = np.where(orig >= n, 2 * n - 1 - orig, orig)
            ref = np.zeros((w.shape[0], n))
            np.add.at(
                ref, (np.repeat(np.arange(w.shape[0]), w.shape[1]), orig.reshape(-1)), w.reshape(-1)
            )
            ours = resize_matrix(n, scale_up if which == "up" else scale_down, w.shape[0])
            res.append(compare(ref, ours, name=f"{which} tap weights {ax} (folded)", atol=tol))
    return res


def check_deltadiff_unet(case: Path, data: dict) -> Results:
    cfg = from_upstream_yaml(case / "config.yaml")
    unet = _load_unet(case, data)
    table = make_step_table(cfg.schedule, "x0")
    scale = {r.t: r.in_scale for r in table.rows}
    res: Results = []
    up4 = BicubicUp4("matlab")
    sc = case / "single_call.npz"
    if sc.exists():
        g = _npz(sc)
        with torch.no_grad():
            if "lr_hwc" in g:
                lq_up = up4(_hwc_to_nchw(g["lr_hwc"]) * 2 - 1).numpy()
                res.append(
                    compare(g["lq_up"], lq_up, name="single_call lq_up", atol=TOL["bicubic"])
                )
            t = int(g["t"][0])
            eta = etas(cfg.schedule)[t]
            if "x_t" in g and "gt" in g:
                x_t = g["gt"] + np.float32(eta) * (g["lq_up"] - g["gt"])
                res.append(compare(g["x_t"], x_t, name="single_call x_t", atol=TOL["intermediate"]))
                x_in = (_t(g["x_t"]) * scale[t]).numpy()
                res.append(
                    compare(g["x_in"], x_in, name="single_call x_in", atol=TOL["intermediate"])
                )
            out = unet(_t(g["x_in"]), _t(g["t"]), _t(g["lq_up"])).numpy()
            res.append(compare(g["output"], out, name="single_call output", atol=TOL["unet"]))
            if "b2_output" in g:
                out = unet(_t(g["b2_x_in"]), _t(g["b2_t"]), _t(g["b2_lq_up"])).numpy()
                res.append(
                    compare(g["b2_output"], out, name="single_call b2_output", atol=TOL["unet"])
                )
    lp = case / "loop_4step.npz"
    if lp.exists():
        g = _npz(lp)
        if "etas" in g:
            res.append(
                compare(
                    g["etas"], etas(cfg.schedule), name="loop etas (schedule)", atol=TOL["table"]
                )
            )
        from deltadiff.model.pipeline import Pipeline

        pipe = Pipeline(cfg.replace(step_rule="x0"), unet)
        seen: dict[str, list[np.ndarray]] = {"x0": [], "x_in": []}
        rows = {r.t: i for i, r in enumerate(pipe.table.rows)}
        if [r.t for r in pipe.table.rows] != [int(v) for v in g["t_seq"]]:
            raise DeltaDiffError(
                f"{lp}: t_seq {g['t_seq'].tolist()} is not the 4-step order 3,2,1,0"
            )

        def hook(row, x0, x_next):  # noqa: ANN001, ANN202
            seen["x0"].append(x0.numpy())

        with torch.no_grad():
            if "lr_hwc" in g:
                y, _ = pipe.encode(_hwc_to_nchw(g["lr_hwc"]))
                res.append(
                    compare(g["lq_up"], y.numpy(), name="loop lq_up (encode)", atol=TOL["bicubic"])
                )
            lq_up = _t(g["lq_up"])
            final = pipe.run_steps(lq_up, lq_up, None, hook).numpy()
            for i in range(len(g["x_in"])):
                x_in = (_t(g["x_t"][i : i + 1]) * pipe.table.rows[i].in_scale).numpy()
                res.append(
                    compare(
                        g["x_in"][i : i + 1], x_in, name=f"loop x_in[{i}]", atol=TOL["intermediate"]
                    )
                )
        for t, i in sorted(rows.items(), reverse=True):
            res.append(
                compare(
                    g["x0_hat"][i : i + 1],
                    seen["x0"][i],
                    name=f"loop x0_hat[{i}] (t={t})",
                    atol=TOL["loop"][i],
                )
            )
        res.append(compare(g["final"], final, name="loop final", atol=TOL["loop"][-1]))
        if "final_clamped" in g:
            res.append(
                compare(
                    g["final_clamped"],
                    np.clip(final, -1, 1),
                    name="loop final_clamped",
                    atol=TOL["loop"][-1],
                )
            )
    return res


def check_resshift_unet(case: Path, data: dict) -> Results:
    res: Results = []
    ucfg = unet_from_params(data["model"]["params"])
    uc = case / "unet_call.npz"
    if uc.exists():
        unet = _load_unet(case, data)
        g = _npz(uc)
        with torch.no_grad():
            out = unet(_t(g["x_in"]), _t(g["t"]), _t(g["lq"])).numpy()
            res.append(compare(g["output"], out, name="unet_call output", atol=TOL["unet"]))
            if "b2_output" in g:
                out = unet(_t(g["b2_x_in"]), _t(g["b2_t"]), _t(g["b2_lq"])).numpy()
                res.append(
                    compare(g["b2_output"], out, name="unet_call b2_output", atol=TOL["unet"])
                )
    sm = case / "swin_masks.npz"
    if sm.exists():
        g = _npz(sm)
        ws = ucfg.window_size
        for key in sorted(g):
            m = re.fullmatch(r"mask_(\d+)x(\d+)", key)
            if not m:
                continue
            h, w = int(m.group(1)), int(m.group(2))
            ours = shift_mask(h, w, ws, ws // 2).numpy()
            res.append(compare_equal(g[key], ours, name=f"swin {key} (exact)"))
    return res


def check_vq(case: Path, data: dict) -> Results:
    vq = _load_vq(case, data)
    g = _npz(case / "vq_golden.npz")
    res: Results = []
    with torch.no_grad():
        z = vq.encode(_t(g["image"]))
        res.append(compare(g["encode"], z.numpy(), name="vq encode", atol=TOL["vq_encode"]))
        idx = vq.quantize.indices(z).numpy()
        res.append(compare_equal(g["indices"], idx, name="vq indices (exact)"))
        if "indices_bhw" in g:
            res.append(
                compare_equal(
                    g["indices_bhw"],
                    idx.reshape(g["indices_bhw"].shape),
                    name="vq indices_bhw (exact)",
                )
            )
        zq = vq.quantize(z).numpy()
        res.append(compare(g["quantized"], zq, name="vq quantized", atol=TOL["vq_encode"]))
        if "codebook_lookup" in g:
            zg = vq.quantize(_t(g["encode"])).numpy()
            res.append(
                compare(
                    g["codebook_lookup"], zg, name="vq codebook_lookup", atol=TOL["intermediate"]
                )
            )
        dq = vq.decode(_t(g["encode"]), quantize=True).numpy()
        res.append(
            compare(g["decode_quantized"], dq, name="vq decode_quantized", atol=TOL["vq_decode"])
        )
        dn = vq.decode(_t(g["encode"]), quantize=False).numpy()
        res.append(
            compare(
                g["decode_not_quantized"], dn, name="vq decode_not_quantized", atol=TOL["vq_decode"]
            )
        )
    return res


def check_resshift_step(case: Path, data: dict) -> Results:
    cfg = from_upstream_yaml(case / "config.yaml", family="resshift-v3")
    unet = _load_unet(case, data)
    vq = _load_vq(case, data)
    g = _npz(case / "step_golden.npz")
    table = make_step_table(cfg.schedule, "posterior-noise")
    res: Results = []
    # schedule arrays (float64) vs the step table
    se, et = sqrt_etas(cfg.schedule), etas(cfg.schedule)
    res.append(compare(g["sqrt_etas"], se, name="sqrt_etas (schedule)", atol=TOL["table"]))
    res.append(compare(g["etas"], et, name="etas (schedule)", atol=TOL["table"]))
    by_t = {r.t: r for r in table.rows}
    ts = sorted(by_t)
    if "posterior_mean_coef1" in g:
        res.append(
            compare(
                g["posterior_mean_coef1"],
                [by_t[t].a for t in ts],
                name="coef1 = a_t",
                atol=TOL["table"],
            )
        )
        res.append(
            compare(
                g["posterior_mean_coef2"],
                [by_t[t].b for t in ts],
                name="coef2 = b_t",
                atol=TOL["table"],
            )
        )
    if "posterior_log_variance_clipped" in g:
        std = np.exp(0.5 * g["posterior_log_variance_clipped"])
        ours = [by_t[t].s if t else std[0] for t in ts]  # t=0 adds no noise; table keeps s_0 = 0
        res.append(compare(std, ours, name="posterior std = s_t (t>0)", atol=TOL["table"]))
    t = int(g["t"][0])
    r = by_t[t]
    with torch.no_grad():
        up = BicubicUp4(cfg.upsampler)(_t(g["lq"]))
        res.append(
            compare(
                g["lq_up_torch_bicubic"],
                up.numpy(),
                name="lq_up_torch_bicubic",
                atol=TOL["bicubic"],
            )
        )
        z_y = vq.encode(_t(g["lq_up_torch_bicubic"])).numpy()
        res.append(compare(g["z_y"], z_y, name="z_y (vq encode)", atol=TOL["vq_encode"]))
        x_in = (_t(g["z_t"]) * r.in_scale).numpy()
        res.append(compare(g["x_in"], x_in, name="x_in", atol=TOL["intermediate"]))
        x0 = unet(_t(g["x_in"]), _t(g["t"]), _t(g["lq"])).numpy()
        res.append(compare(g["pred_xstart"], x0, name="pred_xstart", atol=TOL["step"]))
        # one row of the step table, the same code every backend runs
        from deltadiff.model.pipeline import Pipeline

        pipe = Pipeline(cfg, unet, vq)
        tt = _t(g["t"])
        mean = pipe.step(_t(g["z_t"]), _t(g["z_y"]), _t(g["lq"]), tt, r.in_scale, r.a, r.b, r.c)
        res.append(compare(g["mean"], mean.numpy(), name="mean (step, no noise)", atol=TOL["step"]))
        sample = pipe.step(
            _t(g["z_t"]),
            _t(g["z_y"]),
            _t(g["lq"]),
            tt,
            r.in_scale,
            r.a,
            r.b,
            r.c,
            r.s,
            _t(g["noise"]),
        )
        res.append(
            compare(g["sample"], sample.numpy(), name="sample (step + noise)", atol=TOL["step"])
        )
    return res


CASES: list[tuple[str, Callable[..., Results]]] = [
    ("matlab_bicubic.npz", check_bicubic),
    ("loop_4step.npz", check_deltadiff_unet),
    ("single_call.npz", check_deltadiff_unet),
    ("unet_call.npz", check_resshift_unet),
    ("swin_masks.npz", check_resshift_unet),
    ("vq_golden.npz", check_vq),
    ("step_golden.npz", check_resshift_step),
]


def run_case(case: Path) -> tuple[str, Results] | None:
    """Check one case folder; None if it holds no known golden arrays."""
    files = {p.name for p in case.iterdir()}
    for marker, fn in CASES:
        if marker in files:
            if fn is check_bicubic:
                return fn.__name__, fn(case, case / marker)
            data = load_yaml(case / "config.yaml")
            return fn.__name__, fn(case, data)
    return None


def check_folder(root: str | Path) -> dict[str, Results]:
    root = Path(root)
    if not root.is_dir():
        raise DeltaDiffError(f"golden folder {root} does not exist or is not a directory")
    out: dict[str, Results] = {}
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        r = run_case(case)
        if r is not None:
            out[case.name] = r[1]
    return out


def default_folder() -> Path:
    """The golden vectors committed with the repository (``tests/golden``), for a source checkout
    or an editable install; a wheel does not ship them, so pass a folder there."""
    folder = Path(__file__).resolve().parents[1] / "tests" / "golden"
    if not folder.is_dir():
        raise DeltaDiffError(
            f"no golden folder given and {folder} does not exist (installed without the "
            "repository's tests/); pass FOLDER, e.g. the tests/golden folder of a clone"
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m deltadiff.model.golden", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "folder",
        type=Path,
        nargs="?",
        help="folder laid out like tests/golden (default: the repository's tests/golden)",
    )
    args = ap.parse_args(argv)
    try:
        args.folder = args.folder or default_folder()
        with torch.no_grad():
            results = check_folder(args.folder)
    except DeltaDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no golden cases found in {args.folder}", file=sys.stderr)
        return 2
    n = failed = 0
    for case, rs in results.items():
        print(f"[{case}]")
        for r in rs:
            print("  " + r.line())
            n += 1
            failed += not r.passed
    print(
        f"{n - failed}/{n} outputs within tolerance in {len(results)} cases"
        + (f"; {failed} FAILED" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
