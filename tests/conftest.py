"""Shared test fixtures. ``freqdiff`` is imported first so ``import lightning`` works on CPU torch."""

import pytest
import torch

import freqdiff  # noqa: F401


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
