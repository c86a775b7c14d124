import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # torch's own deprecation chatter from pytree / export internals is not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning)
