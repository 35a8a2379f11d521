"""Where real data is read from (never copied into the repository, never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "SSMJAX_DATA"


def default_data_dir() -> Path | None:
    """``$SSMJAX_DATA`` if set, else ``<repo root>/../shared/data`` if it exists, else ``None``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return shared if shared.is_dir() else None
