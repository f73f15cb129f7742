"""Remote sources over a loopback HTTP server that misbehaves: dropped connections, 429/503, no Range."""

from __future__ import annotations

import gzip
import http.server
import threading
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import drain

import ringload
from ringload._http import RemoteReadError, ResumableHTTPFile, SourceMeter


@dataclass
class Faults:
    data: bytes = b""
    cuts: int = 0  # this many responses are cut after cut_bytes of body
    cut_bytes: int = 50_000
    refusals: int = 0  # this many requests get refusal_status first
    refusal_status: int = 503
    ignore_range: bool = False
    requests: int = 0
    sent: int = 0


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        faults: Faults = self.server.faults
        faults.requests += 1
        if faults.refusals:
            faults.refusals -= 1
            self.send_response(faults.refusal_status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, requested = 0, self.headers.get("Range")
        if requested and not faults.ignore_range:
            start = int(requested.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(faults.data) - 1}/{len(faults.data)}")
        else:
            self.send_response(200)
        body = faults.data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if faults.cuts:
            faults.cuts -= 1
            body = body[:faults.cut_bytes]
            self.close_connection = True
        faults.sent += len(body)  # counted before the write: the client may finish reading before it returns
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A loopback server whose faults each test sets; yields (faults, base URL)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    httpd.faults = Faults()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.faults, f"http://127.0.0.1:{httpd.server_address[1]}/data"
    httpd.shutdown()


def read_all(url: str, **kwargs) -> tuple[bytes, SourceMeter]:
    """The whole remote file, and the meter that counted the bytes fetched for it."""
    meter = SourceMeter()
    remote = ResumableHTTPFile(url, backoff=0.01, meter=meter, **kwargs)
    chunks = []
    while block := remote.read(30_000):
        chunks.append(block)
    return b"".join(chunks), meter


def test_dropped_connections_resume_at_the_offset(server):
    """Each cut connection is reopened with a Range at the consumed offset: every byte read once, none twice."""
    faults, url = server
    faults.data, faults.cuts = bytes(range(256)) * 4000, 5
    data, meter = read_all(url)
    assert data == faults.data
    assert faults.requests == 1 + 5 and faults.sent == len(faults.data) == meter.fetched == meter.listed


def test_429_and_503_are_retried(server):
    """Throttling and unavailable answers are retried with backoff, then the read goes on."""
    faults, url = server
    faults.data, faults.refusals, faults.refusal_status = b"x" * 100_000, 3, 429
    data, _ = read_all(url)
    assert data == faults.data and faults.requests == 1 + 3


def test_server_without_range_support_is_detected(server, caplog):
    """A server that ignores Range is reported, and the resumed stream is still exact (at the cost of re-reads)."""
    faults, url = server
    faults.data, faults.cuts, faults.ignore_range = bytes(range(256)) * 2000, 2, True
    with caplog.at_level("WARNING", logger="ringload.http"):
        data, meter = read_all(url)
    assert data == faults.data
    assert "ignores Range" in caplog.text and meter.fetched > len(faults.data)


def test_bounded_retries_fail_with_url_and_offset(server):
    """After `retries` failures in a row the read fails with an error naming the URL and the byte offset."""
    faults, url = server
    faults.data, faults.refusals = b"y" * 1000, 100
    with pytest.raises(RemoteReadError, match=r"127\.0\.0\.1.*giving up at byte 0 after 3 retries"):
        read_all(url, retries=3)


def test_ring_over_a_flaky_server_equals_the_local_stream(recipe_file, ring_name, server, corpus):
    """A gzip jsonl served with dropped connections streams batch for batch what the local file does,
    and the file crosses the network once however many producers there are (as `ringload status` reports)."""
    faults, url = server
    faults.data = gzip.compress(corpus["jsonl"].read_bytes())
    faults.cuts, faults.cut_bytes = 3, 40_000
    remote = recipe_file(source={"paths": [url + ".jsonl.gz"]}, producers=3)
    with ringload.start(remote, name=ring_name):
        got = drain(ring_name)
        reported = ringload.ring_status(ring_name)["source_bytes"]
    assert reported == {"fetched": len(faults.data), "listed": len(faults.data), "from_cache": 0}
    with ringload.start(recipe_file(), name=ring_name):
        reference = drain(ring_name)
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
    assert faults.sent == len(faults.data)
