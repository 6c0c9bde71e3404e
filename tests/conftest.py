"""Test-session rules: under KFAC_DIST_STRICT=1 (set by .ci/run) a skipped test is a failure; float32 default dtype.

The one exception: a test marked ``outside_project`` needs something that is not part of the project and that no
package index here holds (KAISA's kfac-pytorch 0.4.2, the side-by-side anchor kept beside the checkout for timing
only, never vendored); its skip stays a skip, with its reason in the summary.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
import torch

STRICT = os.environ.get("KFAC_DIST_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """Turn a skip into a failure in strict mode: in CI a missing component must not pass silently."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and item.get_closest_marker("outside_project") is None:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"KFAC_DIST_STRICT=1: skipped tests fail ({reason})"


@pytest.fixture(autouse=True)
def _restore_default_dtype() -> Generator[None, None, None]:
    """Each test starts with float32 as torch's default dtype, whatever an earlier test (or its in-process rank) set."""
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(torch.float32)


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``outside_project`` marker (see the module docstring)."""
    config.addinivalue_line("markers", "outside_project: needs an anchor outside the project; may skip under strict")
