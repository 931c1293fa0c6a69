"""Fixtures of the whole suite; shared helpers live in tests/_helpers.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
