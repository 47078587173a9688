"""Where mtplab keeps what it makes once per user: the converted bundled model and this machine's measurements."""
from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$MTPLAB_HOME``, else ``~/.cache/mtplab``."""
    return Path(os.environ.get("MTPLAB_HOME") or Path.home() / ".cache" / "mtplab")
