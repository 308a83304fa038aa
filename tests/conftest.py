import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """torch on one thread for a test (use with pytestmark = usefixtures("one_thread")):
    tiny networks gain nothing from a second thread; on busy shared cores two threads
    spin against each other and a few steps take minutes instead of seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server process on 127.0.0.1 (see tests/servers.py), for the session."""
    from servers import start_s3

    server = start_s3(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory):
    """A `dask scheduler` process and two `dask worker` processes on 127.0.0.1."""
    from servers import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("dask"), n_workers=2)
    yield cluster
    cluster.stop()
