import os

import pytest
import torch

# Tests must not depend on a tuning table in the user's cache (`toroidal bench --tune`); the
# tuning tests point this at their own files.
os.environ["TOROIDAL_TUNING_FILE"] = "off"


@pytest.fixture(scope="module")
def one_thread():
    """Micro models gain nothing from threads, and a busy 2-core machine makes them spin: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
