import pytest

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
