"""Row status codes: data, not exceptions. Downstream readers see only OK rows."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

_DESCRIPTIONS = {
    0: "pending (block not written yet)",
    1: "ok",
    2: "unreadable (file could not be decoded)",
    3: "too large (over the decode limit)",
    4: "unsupported mode (image mode not handled)",
    5: "duplicate (same content as an earlier row)",
    6: "failed (error while processing)",
    7: "skipped (not ok upstream)",
    8: "failed: non-finite output (the model gave NaN or Inf)",
}


class Status(IntEnum):
    """Per-row status stored as uint8 in every store's `status` array."""

    PENDING = 0
    OK = 1
    UNREADABLE = 2
    TOO_LARGE = 3
    UNSUPPORTED_MODE = 4
    DUPLICATE = 5
    FAILED = 6
    SKIPPED = 7
    NON_FINITE = 8

    def describe(self) -> str:
        """Human-readable meaning, used in summaries."""
        return _DESCRIPTIONS[int(self)]


def status_counts(status: np.ndarray) -> dict[str, int]:
    """{status name (lower case): count} for every code present (unknown codes as `code_<n>`)."""
    values, counts = np.unique(np.asarray(status, dtype=np.uint8), return_counts=True)
    out: dict[str, int] = {}
    for v, n in zip(values.tolist(), counts.tolist(), strict=True):
        name = Status(v).name.lower() if v in Status._value2member_map_ else f"code_{v}"
        out[name] = int(n)
    return out


def summary_line(status: np.ndarray) -> str:
    """One line like `1000 rows: 990 ok, 7 unreadable, 3 duplicate`."""
    counts = status_counts(status)
    parts = [f"{n} {name.replace('_', ' ')}" for name, n in counts.items()]
    return f"{int(np.asarray(status).size)} rows: " + ", ".join(parts)
