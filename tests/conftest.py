"""Shared test setup: import the project from the repository root, one torch thread."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(ROOT), "shared", "golden")
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models run fastest on one thread; the CI has two cores


@pytest.fixture
def golden():
    """Path of ../shared/golden; tests that compare against it skip when it is absent."""
    if not os.path.isdir(GOLDEN):
        pytest.skip("../shared/golden not found")
    return GOLDEN
