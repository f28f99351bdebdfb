"""Shared fixtures. ``import ood_det`` first: it applies the detectron2 v0.6 shims."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ood_det  # noqa: F401
from ood_det import compat
from ood_det.env_info import short

REPO = Path(__file__).resolve().parent.parent


def pytest_terminal_summary(terminalreporter):
    """Which libraries, and which detectron2, the suite ran against (v0.6 and main both say "0.6").

    At the end rather than in the header, which ``-q`` (``make test``) leaves out.
    """
    terminalreporter.write_sep("-", "ran against")
    terminalreporter.write_line(short())
    where = compat.detectron2_dir()
    if where is not None:
        used = compat.used_shims(where)
        kind = f"v0.6 (uses {', '.join(used)}: shimmed where removed)" if used else (
            "newer than v0.6 (uses none of the names v0.6 needs shims for)")
        terminalreporter.write_line(f"detectron2 from {where}: {kind}")


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
