"""The red-team list of issue 13, rerun through the CLI: `python tests/redteam.py [WORKDIR]`.

Not a pytest module (the assertions a user would notice live in test_reliability.py):
a script that tries each hostile case as a user or an attacker would, with fresh
`deltaedit` processes, and prints one row per case (expected outcome, exit status, the
line it printed, traceback or not), then the totals: cases tried, handled correctly,
tracebacks.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BASE = ["-q", "--params", os.devnull, "--set", "execution.device=cpu"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def cli(*args: str, nan: bool = False) -> subprocess.CompletedProcess:
    head = [str(ROOT / "tests" / "nan_models.py")] if nan else ["-m", "pipeline"]
    return subprocess.run(
        [sys.executable, *head, *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, bool, str]] = []

    def case(
        self, name: str, res: subprocess.CompletedProcess, refuse: bool, want: str, extra=True
    ) -> None:
        """refuse: a one-line error (exit 1) containing `want` is expected; else exit 0 with
        `want` in stdout. `extra`: a further check (nothing written, store verifies...)."""
        text = res.stdout + res.stderr
        tb = "Traceback" in text
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        if refuse:
            ok = res.returncode == 1 and len(lines) == 1 and want in lines[0]
            shown = lines[0] if lines else f"(exit {res.returncode}, no stderr)"
        else:
            ok = res.returncode == 0 and want in res.stdout
            shown = next((x for x in res.stdout.splitlines() if want in x), res.stdout[-200:])
        ok = ok and bool(extra) and not tb
        self.rows.append((name, ok, tb, shown.strip()[:230]))
        mark = "ok  " if ok else "FAIL"
        print(f"{mark} {'TRACEBACK ' if tb else ''}{name}: exit {res.returncode}: {shown[:230]}")
        sys.stdout.flush()

    def totals(self) -> str:
        n = len(self.rows)
        good = sum(r[1] for r in self.rows)
        tbs = sum(r[2] for r in self.rows)
        return f"cases tried {n}, handled correctly {good}, tracebacks {tbs}"


def images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def bad_files(folder: Path) -> dict[str, str]:
    """A few hostile files and the status each should get in the manifest."""
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, "PNG")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "truncated.png").write_bytes(good.getvalue()[:30])
    (folder / "dup.png").write_bytes((folder / "000.png").read_bytes())
    return {
        "zero.png": "unreadable",
        "text.png": "unreadable",
        "truncated.png": "unreadable",
        "dup.png": "duplicate",
    }


def tree(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def verified(path: Path) -> bool:
    return cli("store", "verify", str(path)).returncode == 0


def wait_for(check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the pass never got there")
        time.sleep(0.01)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def main(work: Path) -> int:
    from test_reliability import edit_args, write_nan_store

    from store import RowStore, Status, read_lease
    from store.lease import lease_url

    r = Report()
    src = images(work / "img", 40)
    expect = bad_files(src)
    ds = work / "ds"

    # --- the bad-file corpus and ingest ---------------------------------------------
    res = cli("ingest", str(src), "--out", str(ds), *BASE, "--set", "ingest.rows_per_shard=4")
    m = RowStore.open(str(ds / "manifest.zarr"))
    names = [Path(s).name for s in m.read("source")]
    status = m.status()
    got = {n: Status(int(status[names.index(n)])).name.lower() for n in expect}
    r.case("ingest: bad files get their status", res, False, "ingest:", got == expect)

    tar_path = work / "tars" / "evil.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tf:
        data = (src / "001.png").read_bytes()
        for name in ("../escape.png", "/abs.png", "ok.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    res = cli("ingest", str(tar_path.parent), "--out", str(work / "tards"), *BASE)
    escaped = (work / "escape.png").exists() or Path("/abs.png").exists()
    r.case("ingest: escaping tar members refused as rows", res, False, "ingest:", not escaped)

    # --- encoder passes, concurrency and the lease ----------------------------------
    enc = ["--dataset", str(ds), *BASE, "--set", "execution.batch_size=2"]
    first = popen("encode-clip", *enc)
    wait_for(lambda: read_lease(str(ds / "clip.zarr")) is not None or first.poll() is not None)
    first.send_signal(signal.SIGSTOP)
    same = cli("encode-clip", *enc)
    other = cli("encode-clip", *enc, "--set", "clip.seed=1")
    first.send_signal(signal.SIGCONT)
    out, err = first.communicate()
    r.case("two encode-clip, same model: second refuses", same, True, "in use by encode-clip")
    r.case("two encode-clip, other model: second refuses", other, True, "in use by encode-clip")
    fake = subprocess.CompletedProcess([], first.returncode, out, err)
    r.case("the first pass completes, store verifies", fake, False, "encode-clip:", verified(ds))

    # SIGKILL mid-pass, then rerun: the dead pid's lease is taken over, nothing redone twice
    killed = popen("encode-s", *enc)
    wait_for(lambda: (ds / "s.zarr" / "zarr.json").exists() or killed.poll() is not None)
    time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = read_lease(str(ds / "s.zarr")) is not None
    res = cli("encode-s", *enc)
    r.case(
        "SIGKILL mid-pass, rerun resumes (stale lease taken over)",
        res,
        False,
        "encode-s:",
        verified(ds) and (not left or "took over the lease" in res.stdout),
    )
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    from store.lease import LeaseInfo

    now = time.time()
    Path(lease_url(str(ds / "clip.zarr"))).write_bytes(
        LeaseInfo("x", os.uname().nodename, holder.pid, now, now, "encode-clip", "t" * 32).to_json()
    )
    res = cli("encode-clip", *enc, "--overwrite")
    r.case("live lease held elsewhere: refused", res, True, f"pid {holder.pid}")
    res = cli("encode-clip", *enc, "--break-lease")
    r.case("--break-lease takes it over", res, False, "took over the lease")
    holder.kill()
    holder.wait()

    # --- model mix-ups ----------------------------------------------------------------
    r.case(
        "encode-clip resume with another CLIP",
        cli("encode-clip", *enc, "--set", "clip.seed=1"),
        True,
        "fingerprint",
    )
    r.case(
        "encode-s resume with another generator",
        cli("encode-s", *enc, "--set", "generator.seed=1"),
        True,
        "fingerprint",
    )
    r.case(
        "encode-s resume with another e4e",
        cli("encode-s", *enc, "--set", "e4e.seed=1"),
        True,
        "fingerprint",
    )
    smp, smp1 = work / "smp", work / "smp1"
    cli("sample", "--n", "16", "--out", str(smp), *BASE, "--set", "sample.rows_per_shard=8")
    cli("sample", "--n", "8", "--out", str(smp1), *BASE, "--set", "generator.seed=1")
    mapper = work / "mapper.safetensors"
    train = [
        "train",
        *BASE,
        "--iterations",
        "3",
        "--set",
        f"train.out={mapper}",
        "--set",
        f"train.metrics_dir={work / 'metrics'}",
        "--set",
        "train.batch_size=4",
    ]
    cli(*train, "--set", f"train.stores=['{smp}']")
    smpc = work / "smpc"
    cli("sample", "--n", "8", "--out", str(smpc), *BASE, "--set", "clip.seed=1")
    r.case(
        "train on stores of two CLIPs",
        cli(*train, "--set", f"train.stores=['{smp}','{smpc}']"),
        True,
        "CLIP",
    )
    r.case(
        "train on stores of two generators",
        cli(*train, "--set", f"train.stores=['{smp}','{smp1}']"),
        True,
        "generator",
    )

    def edit(store: Path, *more: str) -> list[str]:
        return [*edit_args(store, mapper, work / "edits"), *more]

    r.case(
        "edit with a CLIP other than the mapper's",
        cli(*edit(smp, "--set", "clip.seed=1")),
        True,
        "CLIP",
    )
    r.case(
        "edit a store encoded with another generator (was accepted)",
        cli(*edit(smp1)),
        True,
        "encoded with generator",
        not (work / "edits").exists(),
    )
    r.case(
        "relevance with another generator than s.zarr's",
        cli(
            "relevance",
            *BASE,
            "--store",
            str(smp),
            "--out",
            str(work / "rel.zarr"),
            "--set",
            "generator.seed=1",
        ),
        True,
        "generator",
    )
    evil = work / "evil.pt"
    marker = work / "pwned"
    with open(evil, "wb") as f:
        pickle.dump({"g_ema": _Evil(marker)}, f)
    res = cli("encode-s", *enc, "--overwrite", "--set", f"generator.path={evil}")
    r.case(
        "a code-running .pt generator is refused", res, True, str(evil.name), not marker.exists()
    )

    # --- non-finite outputs -------------------------------------------------------------
    nds = work / "nds"
    cli("ingest", str(src), "--out", str(nds), *BASE, "--set", "ingest.rows_per_shard=4")
    res = cli("encode-clip", "--dataset", str(nds), *BASE, nan=True)
    r.case(
        "encode-clip with a NaN model: rows failed, counted",
        res,
        False,
        "NON_FINITE",
        verified(nds),
    )
    res = cli("encode-s", "--dataset", str(nds), *BASE, nan=True)
    r.case("encode-s with a NaN model", res, False, "NON_FINITE", verified(nds))
    res = cli("sample", "--n", "8", "--out", str(work / "nsmp"), *BASE, nan=True)
    r.case("sample with a NaN generator", res, False, "NON_FINITE", verified(work / "nsmp"))
    res = cli(*edit(smp), nan=True)
    r.case("edit with a NaN mapper", res, False, "failed: non-finite output")
    bad = work / "nanstore"
    write_nan_store(bad, 16, [1, 5])
    res = cli(*train, "--set", f"train.stores=['{bad}']")
    r.case("train on a store with NaN ok rows", res, True, "2 ok rows hold NaN or Inf")

    # --- errors that printed a traceback --------------------------------------------------
    before = tree(ds)
    res = cli(
        "encode-clip",
        *enc,
        "--overwrite",
        "--set",
        "clip.name=world-clip",
        "--set",
        f"clip.weights={work / 'none' / 'clip.safetensors'}",
    )
    r.case(
        "missing clip.weights file", res, True, "CLIP weights file not found", tree(ds) == before
    )
    (work / "afile").write_text("x")
    res = cli("ingest", str(src), "--out", str(work / "afile" / "ds"), *BASE)
    r.case("output path under a file", res, True, "cannot write there")
    res = cli("ingest", str(src), "--out", "/sys/deltaedit-redteam", *BASE)
    r.case("output path without permission", res, True, "cannot write there")
    p = work / "params"
    p.mkdir()
    for name, text, want in [
        ("missing --params file", None, "no such file"),
        ("unknown params section", "encode_clipp:\n  dataset: x\n", "unknown params section"),
        ("invalid YAML", "execution:\n  workers: [1, 2\n", ":3:"),
        ("section given as a list", "execution:\n  - cpu\n", "params: execution: got"),
    ]:
        f = p / f"{len(r.rows)}.yaml"
        if text is not None:
            f.write_text(text)
        res = cli("encode-clip", "--dataset", str(ds), "-q", "--params", str(f))
        r.case(name, res, True, want, "execution.execution" not in res.stderr)
    print(r.totals())
    return 0 if all(row[1] for row in r.rows) else 1


if __name__ == "__main__":
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="redteam-"))
    sys.exit(main(work))
