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
