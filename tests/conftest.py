import pytest
import torch

from privatelora.models import load_backbone

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
