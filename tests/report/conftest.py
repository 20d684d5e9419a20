"""Typed report fixtures (builders in tests/report/fixtures.py, importable by other test packages)."""
from __future__ import annotations

import pytest

from dfmpc_deploy.report import Report
from tests.report import fixtures


@pytest.fixture
def full_report() -> Report:
    """Every section filled: the real ResNet-20 build plus recipe passes, runtime, statistics and pairs."""
    return fixtures.full_report()


@pytest.fixture
def minimal_report() -> Report:
    """Only the required sections."""
    return fixtures.minimal_report()


@pytest.fixture
def deep_report() -> Report:
    """ResNet-152-shaped: 156 layers."""
    return fixtures.deep_report()
