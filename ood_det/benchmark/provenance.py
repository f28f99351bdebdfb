"""Where a benchmark result came from: the code's commit, the machine and the command.

A number without these cannot be reproduced or compared, so every result file carries them.
"""
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

#: The source checkout holding the package (tools/train_net.py and configs/ live there).
REPO = Path(__file__).resolve().parents[2]


def git(*cmd):
    """Output of ``git <cmd>`` in the checkout, or None where git or the repository is missing."""
    try:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info():
    """(``git rev-parse HEAD``, whether the work tree has uncommitted changes); None where unknown.

    A dirty tree means the numbers came from code that no commit holds.
    """
    status = git("status", "--porcelain")
    return git("rev-parse", "HEAD"), None if status is None else bool(status)


def _cpu_model():
    """Linux names the CPU model in /proc/cpuinfo; platform.processor() is often empty there."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return name or platform.processor() or None


def machine_info(device):
    """The CPU, the CPUs this process may use, torch's threads and the device (with its GPU's name)."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    return info


def display_command(argv=None):
    """The command line as a user would retype it from the checkout (no machine paths)."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        script = Path(argv[0]).name
    return shlex.join(["python", str(script), *map(str, argv[1:])])


def now():
    """UTC time in ISO 8601, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
