"""Errors raised by the store: one line each, saying what is wrong and what to run."""

from __future__ import annotations


class StoreError(Exception):
    """A store problem a user can act on; the message is one line: what is wrong, what to run."""


class StorageError(StoreError):
    """A location that cannot be used: no fsspec implementation for its scheme, an
    unreachable endpoint, refused credentials, bad storage options."""


class NotAStore(StoreError):
    """The path holds no deltaedit store (missing, not Zarr, or a Zarr group of another tool)."""


class SchemaTooNew(StoreError):
    """The store was written by a newer deltaedit (higher schema_version)."""


class MissingArray(StoreError):
    """An array the store should hold (or a reader asked for) is not there."""


class FingerprintMismatch(StoreError):
    """The store was produced by another model/config than the one asked for."""

    def __init__(self, url: str, stored: str | None, expected: str | None, hint: str = "") -> None:
        self.url = url
        self.stored = stored
        self.expected = expected
        hint = hint or "rerun the stage that writes it with overwrite, or use the matching model"
        msg = (
            f"{url}: written by producer fingerprint {stored!r}, this run uses {expected!r}; {hint}"
        )
        super().__init__(msg)


class IncompletePass(StoreError):
    """Blocks are still pending (an interrupted pass) and the reader needs a complete store."""

    def __init__(self, url: str, pending: list[int], n_blocks: int, hint: str = "") -> None:
        self.url = url
        self.pending = list(pending)
        self.n_blocks = n_blocks
        shown = ", ".join(str(b) for b in self.pending[:8]) + (", ..." if len(pending) > 8 else "")
        hint = hint or "rerun the stage that writes it (it resumes, redoing only pending blocks)"
        msg = (
            f"{url}: pass incomplete, {len(pending)} of {n_blocks} blocks pending ({shown}); {hint}"
        )
        super().__init__(msg)
