"""Static figures (matplotlib/seaborn), one module per theme.

Importing this package inside a Jupyter kernel shows inline figures as JPEG (quality 85) instead of
PNG: the photo grids of the notebooks are then a few hundred kB instead of megabytes, which keeps
the committed notebooks light. Figures saved to files are unaffected (PNG).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | os.PathLike | None, *, dpi: int = 110) -> Any:
    """Save ``fig`` as PNG at ``path`` (if given; parent folders made) and return it."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig


def compact_inline_figures(quality: int = 85) -> bool:
    """Show inline figures as JPEG in a running IPython kernel; False (and no change) outside one."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    set_matplotlib_formats("jpeg", pil_kwargs={"quality": quality})
    return True


compact_inline_figures()
