"""Resumable HTTP(S) reads: a sequential file object that survives dropped connections.

The reader thread reads a remote file front to back exactly once. When the connection drops
mid-body, or the server answers 429/5xx, this file waits (exponential backoff) and reopens the
URL with ``Range: bytes=<offset>-`` at the byte offset already consumed, so nothing is lost or
read twice; after ``retries`` failed attempts in a row it raises an error naming the URL and the
offset. A server that ignores Range (answers 200 to a range request) is detected: the file says
so in the log and skips the bytes it already has, which costs bandwidth but keeps the stream
exact.
"""

from __future__ import annotations

import http.client
import io
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("ringload.http")
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
BLOCK = 1 << 16


class RemoteReadError(OSError):
    """A remote file could not be read even after retrying."""


class ResumableHTTPFile(io.RawIOBase):
    """Read-only, forward-only file over an HTTP(S) URL that reconnects where it left off."""

    def __init__(self, url: str, retries: int = 8, backoff: float = 0.5, timeout: float = 60.0,
                 headers: dict[str, str] | None = None, meter: SourceMeter | None = None):
        super().__init__()
        self.meter = meter or SourceMeter()
        self.url, self.retries, self.backoff, self.timeout = url, retries, backoff, timeout
        self.headers = dict(headers or {})
        self.offset = 0  # bytes handed to the reader so far
        self.size: int | None = None
        self._response: http.client.HTTPResponse | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        failures = 0
        while True:
            try:
                if self._response is None:
                    self._response = self._open()
                n = self._response.readinto(buffer)
                if n == 0 and self.size is not None and self.offset < self.size:
                    raise http.client.IncompleteRead(b"", self.size - self.offset)
                self.offset += n
                self.meter.fetched += n
                return n
            except (OSError, http.client.HTTPException, _Retry) as exc:
                if isinstance(exc, RemoteReadError):
                    raise
                failures += 1
                self._drop()
                if failures > self.retries:
                    raise RemoteReadError(f"{self.url}: giving up at byte {self.offset} after {self.retries} "
                                          f"retries: {exc}; raise source.retries or check the server") from None
                delay = self.backoff * 2 ** (failures - 1)
                log.warning("%s: %s at byte %d; retrying in %.1f s (%d/%d)", self.url, exc, self.offset, delay,
                            failures, self.retries)
                time.sleep(delay)

    def _open(self) -> http.client.HTTPResponse:
        headers = dict(self.headers)
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {exc.code}") from None
            if exc.code == 416 and self.size is not None and self.offset >= self.size:
                return _EmptyResponse()  # type: ignore[return-value]
            raise RemoteReadError(f"{self.url}: HTTP {exc.code} {exc.reason} at byte {self.offset}") from None
        except (TimeoutError, urllib.error.URLError) as exc:
            raise _Retry(str(getattr(exc, "reason", exc))) from None
        if self.offset == 0 or response.status == 206:
            if response.status == 206 and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {self.offset}-"):
                response.close()
                raise RemoteReadError(f"{self.url}: asked for bytes from {self.offset}, got "
                                      f"{response.headers.get('Content-Range')!r}")
            if self.size is None:
                length = response.headers.get("Content-Length")
                self.size = int(length) + self.offset if length is not None else None
                self.meter.listed += self.size or 0
            return response
        # 200 to a range request: the server ignores Range. Skip what we already have.
        log.warning("%s ignores Range requests; re-reading %d bytes to resume at byte %d", self.url, self.offset,
                    self.offset)
        remaining = self.offset
        while remaining:
            skipped = response.read(min(remaining, BLOCK))
            if not skipped:
                raise _Retry(f"connection closed while skipping to byte {self.offset}")
            self.meter.fetched += len(skipped)
            remaining -= len(skipped)
        return response

    def _drop(self) -> None:
        if self._response is not None:
            try:
                self._response.close()
            except OSError:
                pass
            self._response = None

    def close(self) -> None:
        self._drop()
        super().close()


class _Retry(Exception):
    """A failure worth retrying (connection error, timeout, 429/5xx)."""


class _EmptyResponse:
    def readinto(self, buffer: WriteableBuffer) -> int:
        return 0

    def close(self) -> None:
        pass


def open_url(url: str, retries: int, timeout: float, meter: SourceMeter | None = None) -> io.BufferedReader:
    """A buffered, resumable reader of ``url``."""
    return io.BufferedReader(ResumableHTTPFile(url, retries=retries, timeout=timeout, meter=meter), buffer_size=1 << 20)


@dataclass
class SourceMeter:
    """Bytes read from the sources as stored (before decompression, re-reads included), and the
    sizes of the files opened so far: ``fetched`` over ``listed`` shows what crossed the network."""

    fetched: int = 0
    listed: int = 0


class MeteredFile(io.RawIOBase):
    """A raw binary file that counts the bytes read through it into a ``SourceMeter``."""

    def __init__(self, raw: Any, meter: SourceMeter):
        super().__init__()
        self.raw, self.meter = raw, meter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(getattr(self.raw, "seekable", lambda: False)())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer)
        data = self.raw.read(len(view))
        n = len(data)
        view[:n] = data
        self.meter.fetched += n
        return n
