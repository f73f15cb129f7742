"""Exceptions raised by ringload. Every message says what failed, where, and what to change."""

from __future__ import annotations


class RingloadError(Exception):
    """Base class of every error ringload raises on purpose."""


class RecipeError(RingloadError, ValueError):
    """A recipe is malformed: unknown key, wrong type, impossible geometry."""


class RingError(RingloadError):
    """A ring cannot be created or attached (name, permissions, size, corrupt header)."""


class ProducerFailed(RingloadError):
    """A producer reported an error, or died more often than the daemon may restart it."""


class DaemonGone(RingloadError):
    """The daemon that owns the ring died or stopped while a consumer waited on it."""


class LoaderTimeout(RingloadError, TimeoutError):
    """No batch arrived within the consumer's timeout, although the daemon looked healthy."""
