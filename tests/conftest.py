"""Shared fixtures. `../shared` (golden fixtures, coco_mini) is read in place, never copied.

Where it is absent, tests that need it skip with the reason; with CI=true they fail instead, so a
CI run can never pass by silently skipping parity.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads this when kernels are defined, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RFDETR_FN_SHARED", REPO.parent / "shared"))


def require(path: Path) -> Path:
    """Return `path`, or skip (fail under CI=true) when the shared fixtures are missing."""
    if path.exists():
        return path
    message = f"{path} not found: the shared fixtures live beside the repo (set RFDETR_FN_SHARED to move them)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require(SHARED / "golden")


@pytest.fixture(scope="session")
def coco_mini_dir() -> Path:
    return require(SHARED / "data" / "coco_mini")


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield
