"""Validation helpers shared by the stage config dataclasses.

A stage's config is a frozen dataclass in its own module whose defaults are the
bundled tiny configuration. `validate()` methods call `require` so a bad value
fails before any work, naming the key, the value and what was expected.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}: got {value!r}, expected {expected}")


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)
