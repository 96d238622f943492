"""matplotlib for the benchmarks' PNGs: it comes with the test and bench extras only, so every benchmark
checks for it (``has_matplotlib``) and writes its JSON without a plot when it is missing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def import_pyplot(script: str) -> Any:
    """matplotlib.pyplot on the Agg backend; exits with a hint naming ``script`` when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"{script}: the plot needs matplotlib (pip install matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def has_matplotlib() -> bool:
    """Whether matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as a PNG at 110 dpi and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
