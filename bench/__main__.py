"""``python -m bench`` (from the repository root): every benchmark and one summary of their targets (bench/run.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts and run.py import their helpers as `common`

from run import main  # noqa: E402

sys.exit(main())
