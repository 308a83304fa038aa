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

    def start_worker(self, index: int | None = None, resources: str = "") -> int:
        """Start one worker (replacing `index` if given; `resources` e.g. "GPU=1" for
        `dask worker --resources`); returns its index."""
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
                *(["--resources", resources] if resources else []),
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

    def stop_worker(self, index: int) -> None:
        _stop(self.workers[index])

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


class FlakyProxy:
    """An HTTP proxy on a free loopback port in front of `upstream` (the moto server) that
    fails a seeded fraction `fail_rate` of requests: half of them answered 503 SlowDown (as
    S3 does when overloaded), half dropped (the connection closed without an answer). Runs
    in threads of this process; `fail_rate` may be changed while it runs. Counts requests
    and failures."""

    SLOWDOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream_port: int, fail_rate: float = 0.0, seed: int = 0) -> None:
        import http.server
        import random
        import threading

        self.upstream_port = upstream_port
        self.fail_rate = fail_rate
        self.requests = 0
        self.failed = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._draw()
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(proxy.SLOWDOWN)
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                import http.client

                skip = {"transfer-encoding", "connection", "keep-alive", "content-length"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(HOST, proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in skip:
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _draw(self) -> str:
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.fail_rate:
                return ""
            self.failed += 1
            return "drop" if self._rng.random() < 0.5 else "503"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def options(self, s3: S3Server) -> dict:
        """storage_options through this proxy with botocore's own retries off (one HTTP
        attempt per call; s3fs's retries are a class attribute: see `no_s3fs_retries`)."""
        return {
            **s3.options,
            "endpoint_url": self.endpoint,
            "config_kwargs": {"retries": {"total_max_attempts": 1}},
        }

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def set_s3fs_retries(n: int) -> int:
    """Set s3fs's own retry count (a class attribute, 5 by default) in this process; returns
    the old one. 1 = a single attempt, so only deltaedit's retries are left."""
    import s3fs

    old = s3fs.S3FileSystem.retries
    s3fs.S3FileSystem.retries = n
    return old
