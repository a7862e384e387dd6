import os

# Ray (2.60) enables token authentication for every new local cluster and writes
# ~/.ray/auth_token the first time; it reads RAY_AUTH_MODE once, when it is imported. A
# suite that starts its first cluster midway (a `ray start` head, a demo subprocess) would
# leave the Ray already imported in this process in the wrong mode on a fresh machine:
# run the whole suite, and every subprocess it starts, in token mode from the start.
os.environ.setdefault("RAY_AUTH_MODE", "token")

import pytest  # noqa: E402
import torch  # noqa: E402

from privatelora.model.loading import load_backbone

FAMILIES = ("llama", "mistral", "qwen2")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    if config.getoption("--runslow"):
        config.option.markexpr = ""


@pytest.fixture(scope="session")
def backbones():
    """One tiny random backbone per supported family, built from configs (no downloads)."""
    return {f: load_backbone(f"tiny-{f}") for f in FAMILIES}


@pytest.fixture(scope="module")
def one_thread():
    """Cloud worker thread and device in one process: one torch thread, or the two OpenMP
    pools spin against each other on 2 cores and every op slows down ~100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
