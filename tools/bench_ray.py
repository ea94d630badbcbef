"""Ray batch job vs single-process ``dd-run upscale`` on the same folder, one run, one process.

    python tools/bench_ray.py ../shared/data/val-bicubic-x4/lq --limit 8 \\
        --actors 1,2 --out benchmarks/results/ray

Single process: ``dd-run upscale SRC -o OUT --threads C`` as a subprocess (wall time includes
its start and model load). Ray: one local cluster on 127.0.0.1 with C CPUs (its start time is
reported separately), then ``dd-run batch``'s job with N actors of C/N CPUs each (the job time
includes the actors' start and model load). Outputs are checked to be identical across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deltadiff.runtime.memory_budget import cpu_name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="folder of images")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--limit", type=int, default=8, help="use the first N images")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    from deltadiff.runtime.imageio import find_images
    from deltadiff.runtime.serving.ray_job import RayJobOptions, connect, import_ray, run_ray_job

    work = Path(tempfile.mkdtemp(prefix="dd-bench-ray-"))
    try:
        src = work / "src"
        src.mkdir()
        files = [p for p, _ in find_images([a.src])][: a.limit]
        for p in files:
            shutil.copyfile(p, src / p.name)
        rows = []
        cmd = [sys.executable, "-m", "deltadiff.cli.run", "upscale", str(src), "-o"]
        cmd += [str(work / "single"), "--threads", str(a.cpus), "-q"]
        if a.model:
            cmd += ["--model", str(a.model)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        dt = time.perf_counter() - t0
        rows.append({"run": f"dd-run upscale (1 process, {a.cpus} threads)", "seconds": dt})
        t0 = time.perf_counter()
        connect(RayJobOptions(local_cpus=a.cpus))
        cluster_start = time.perf_counter() - t0
        try:
            for n in [int(x) for x in a.actors.split(",")]:
                out = work / f"ray{n}"
                t0 = time.perf_counter()
                res = run_ray_job(
                    [src],
                    out,
                    model=a.model,
                    opts=RayJobOptions(actors=n, num_cpus=a.cpus / n),
                )
                dt = time.perf_counter() - t0
                assert res.count("done") == len(files), res.rows
                same = all(
                    (out / p.name).read_bytes() == (work / "single" / p.name).read_bytes()
                    for p in files
                )
                rows.append(
                    {
                        "run": f"Ray job, {n} actor(s) x {a.cpus / n:g} CPU",
                        "seconds": dt,
                        "outputs_equal_single": same,
                    }
                )
        finally:
            import_ray().shutdown()
        for r in rows:
            r["images_per_s"] = len(files) / r["seconds"]
            print(
                f"{r['run']:<40} {r['seconds']:7.1f} s  {r['images_per_s']:.3f} img/s"
                + (
                    f"  outputs equal: {r['outputs_equal_single']}"
                    if "outputs_equal_single" in r
                    else ""
                )
            )
        print(f"Ray cluster start: {cluster_start:.1f} s (not included above)")
        rep = {
            "cpu": cpu_name(),
            "images": [p.name for p in files],
            "model": str(a.model or "bundled demo-pixel"),
            "ray_cluster_start_s": cluster_start,
            "runs": rows,
        }
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "bench-ray.json").write_text(json.dumps(rep, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
