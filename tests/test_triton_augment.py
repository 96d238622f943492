"""The Triton view kernels against the torch backend (the cases are in ``triton_cases.py``).

Without CUDA the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1; slow, so sizes stay
small). Triton reads that variable when it is first imported, and torchvision imports it, so the cases
always run in a child pytest started with the right environment; this file checks that every case ran
and passed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import onlinemix_kernels  # noqa: E402

TESTS = Path(__file__).resolve().parent


def test_every_kernel_case_passes() -> None:
    env = {**os.environ}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "triton_cases.py")],
                          capture_output=True, text=True, timeout=600, cwd=TESTS.parent, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?(\d+) passed in .*", summary) and int(re.match(r"=* ?(\d+)", summary).group(1)) >= 13, summary


def test_kernels_come_from_this_checkout() -> None:
    """An editable install of another checkout would test other kernels; install this one (pip install -e .)."""
    assert Path(onlinemix_kernels.__file__).resolve().parent == TESTS.parent / "kernels" / "onlinemix_kernels"
