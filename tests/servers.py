"""Real servers for the tests: a moto S3 server process and a Dask cluster of separate
processes (`dask scheduler` + `dask worker`), all on 127.0.0.1 with free ports.

The worker processes start in their own empty folder (not the test's working directory)
and without any AWS_* variable, so a test passes only if every path sent to them is
absolute and the S3 endpoint and credentials reach them through storage_options.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class S3Server:
    """`python -m moto.server` on a free loopback port; `options` are the storage_options
    a client needs (endpoint + dummy credentials)."""

    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        _stop(self.proc)


def start_s3(log_dir: Path) -> S3Server:
    port = free_port()
    log = log_dir / "moto.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    _wait_port(port, proc, "moto server")
    end = time.monotonic() + 30
    while True:  # listening is not answering yet
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    return S3Server(port, proc, log)


@dataclass
class Cluster:
    """A `dask scheduler` process and `dask worker` processes (one process, one thread
    each), started in an empty folder of their own."""

    port: int
    scheduler: subprocess.Popen
    log_dir: Path
    cwd: Path
    workers: list[subprocess.Popen | None] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"tcp://{HOST}:{self.port}"

    def start_worker(self, index: int | None = None) -> int:
        """Start one worker (replacing `index` if given); returns its index."""
        if index is None:
            index = len(self.workers)
            self.workers.append(None)
        log = self.log_dir / f"worker-{index}-{time.time_ns()}.log"
        self.workers[index] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dask",
                "worker",
                self.address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-nanny",  # the process we hold is the worker: SIGKILL kills it
                "--no-dashboard",
                "--memory-limit",
                "0",
                "--name",
                f"w{index}-{time.time_ns()}",
            ],
            cwd=self.cwd,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        return index

    def wait_workers(self, n: int, timeout: float = 90.0) -> None:
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout)

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker `index` (no nanny: the process dies at once, mid-task)."""
        proc = self.workers[index]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def alive(self) -> int:
        return sum(1 for p in self.workers if p is not None and p.poll() is None)

    def stop(self) -> None:
        for proc in self.workers:
            _stop(proc)
        _stop(self.scheduler)


def start_cluster(log_dir: Path, n_workers: int) -> Cluster:
    port = free_port()
    cwd = Path(tempfile.mkdtemp(prefix="dask-workers-", dir=log_dir))
    scheduler = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dask",
            "scheduler",
            "--host",
            HOST,
            "--port",
            str(port),
            "--no-dashboard",
        ],
        cwd=cwd,
        stdout=(log_dir / f"scheduler-{port}.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    _wait_port(port, scheduler, "dask scheduler")
    cluster = Cluster(port, scheduler, log_dir, cwd)
    for _ in range(n_workers):
        cluster.start_worker()
    if n_workers:
        cluster.wait_workers(n_workers)
    return cluster
