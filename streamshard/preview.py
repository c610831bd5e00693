"""One-line renderings of decoded column values, for ``inspect`` and ``explain``."""

from __future__ import annotations

import json
from typing import Any

PREVIEW_CHARS = 80


def preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    """A one-line, truncated rendering of a decoded column value."""
    import numpy as np

    if isinstance(value, np.ndarray):
        head = np.array2string(value.ravel()[:8], separator=",", threshold=8)
        more = ",..." if value.size > 8 else ""
        return f"{value.dtype}{list(value.shape)} {head[:-1]}{more}]"
    if isinstance(value, bytes):
        text = f"{len(value)} bytes {value[:24].hex()}" + ("..." if len(value) > 24 else "")
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} chars)"
    return text
