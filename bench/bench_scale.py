"""Scale-out: encode-clip, encode-s and render throughput on a real Dask cluster with 1 and
2 worker processes, with the stores on local disk and in S3 on loopback (a moto server),
all measured in one run (tests/servers.py starts the servers: a `dask scheduler` and
`dask worker --nthreads 1` processes, `python -m moto.server`).

Each pass is one `deltaedit` command (in this process, through the CLI: the client's model
load, the lease and the store checks count), rows per second = rows / wall seconds, the
median of `--repeats` runs (encode passes with --overwrite, render into a fresh folder).
The models are loaded once per worker before anything is timed (a warm-up pipeline run),
and the 2-worker runs come first, then one worker is stopped (both stay warm). Printed:

    workers 2 / 1   throughput ratio on disk and on S3 (ideal: 2.0 with 2 free cores)
    S3 / disk       throughput ratio with 1 and with 2 workers (1.0 = storage costs nothing)

    python bench/bench_scale.py            # 512 shapes-world images
    python bench/bench_scale.py --quick    # 128 images, 1 repeat: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from servers import start_cluster, start_s3  # noqa: E402
from test_scale_out import pipeline_params  # noqa: E402

from pipeline.cli import main  # noqa: E402

STAGES = ("encode-clip", "encode-s", "render")


def cli(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"deltaedit {' '.join(args)} failed:\n{result.output[-2000:]}")


def write_params(folder: Path, params: dict, name: str) -> str:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(path)


def timed_passes(params: dict, folder: Path, tag: str, n_rows: int, repeats: int) -> dict:
    """{stage: median rows/s} of encode-clip, encode-s and render with these params."""
    rates: dict[str, list[float]] = {s: [] for s in STAGES}
    n_edits = len(params["edit"]["edits"])
    for rep in range(repeats):
        out_dir = f"{params['render']['out_dir']}-{tag}-{rep}"
        p = {**params, "render": {**params["render"], "out_dir": out_dir}}
        path = write_params(folder, p, f"{tag}-{rep}")
        for stage in STAGES:
            extra = ["--overwrite"] if stage != "render" else []
            t0 = time.perf_counter()
            cli([stage, "--params", path, "-q", *extra])
            seconds = time.perf_counter() - t0
            rows = n_rows * n_edits if stage == "render" else n_rows
            rates[stage].append(rows / seconds)
    return {s: statistics.median(v) for s, v in rates.items()}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="shapes-world images (512; quick 128)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per case (3; quick 1)")
    ap.add_argument("--quick", action="store_true", help="128 images, 1 repeat")
    args = ap.parse_args()
    n = args.n or (128 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    os.chdir(ROOT)  # the params name the committed world models relative to the repo
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    world = tmp / "world"
    cli(["world", "render", "--set", f"world.n_images={n}", "--set", f"world.out_dir={world}"])
    s3 = start_s3(tmp)
    cluster = start_cluster(tmp, n_workers=2)
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        s3.make_bucket("bench")
        roots = {"disk": str(tmp / "disk"), "s3": "s3://bench/run"}
        execution = {
            "scheduler_address": cluster.address,
            "storage_options": s3.options,
            "workers": 1,
        }
        params = {}
        for where, root in roots.items():
            p = pipeline_params(world, root, execution)
            p["ingest"]["rows_per_shard"] = max(8, n // 8)  # 8 blocks: work for 2 workers
            p["render"]["max_rows"] = n
            p["render"]["sheet_rows"] = 4
            params[where] = p
            path = write_params(tmp, p, f"setup-{where}")
            for stage in ("ingest", "encode-clip", "encode-s", "train", "edit", "render"):
                cli([stage, "--params", path, "-q"])  # also loads the models on both workers
        for n_workers in (2, 1):
            if n_workers == 1:
                cluster.stop_worker(1)
                time.sleep(2)
            for where in roots:
                tag = f"{where}-{n_workers}w"
                results[(where, n_workers)] = timed_passes(params[where], tmp, tag, n, repeats)
                rates = results[(where, n_workers)]
                print(f"{tag}: " + ", ".join(f"{s} {r:.1f}" for s, r in rates.items()), flush=True)
    finally:
        cluster.stop()
        s3.stop()
    report(results, n, repeats)


def report(results: dict, n: int, repeats: int) -> None:
    print(
        f"\nbench_scale: {n} shapes-world images, median of {repeats}, {cpu_name()}, "
        f"{os.cpu_count()} cores; rows/s (render: images/s)"
    )
    print(
        f"{'stage':<12} {'disk 1w':>9} {'disk 2w':>9} {'s3 1w':>9} {'s3 2w':>9}"
        f" {'2w/1w disk':>11} {'2w/1w s3':>9} {'s3/disk 1w':>11} {'s3/disk 2w':>11}"
    )
    for s in STAGES:
        d1, d2 = results[("disk", 1)][s], results[("disk", 2)][s]
        s1, s2 = results[("s3", 1)][s], results[("s3", 2)][s]
        print(
            f"{s:<12} {d1:9.1f} {d2:9.1f} {s1:9.1f} {s2:9.1f} {d2 / d1:11.2f} {s2 / s1:9.2f}"
            f" {s1 / d1:11.2f} {s2 / d2:11.2f}"
        )


if __name__ == "__main__":
    main_()
