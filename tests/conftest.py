import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

# `pytest --hypothesis-profile=thorough` runs many more generated models than the default suite.
settings.register_profile("default", max_examples=10, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # torch's own deprecation chatter from pytree / export internals is not ours to fix
    warnings.filterwarnings("ignore", category=FutureWarning)
