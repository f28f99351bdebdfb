"""Shared fixtures. ``import ood_det`` first: it applies the detectron2 v0.6 shims."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ood_det  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def run_tool(script, *args, env=None, timeout=600):
    """Run ``tools/<script>`` with this interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
