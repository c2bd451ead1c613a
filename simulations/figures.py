"""Saving plots: every results PNG is written atomically and its figure released."""

from __future__ import annotations

from pathlib import Path

from fedsoup.atomic import atomic_path


def save_png(fig, path: str | Path) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and close it."""
    import matplotlib.pyplot as plt  # only the plotting commands need matplotlib

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
