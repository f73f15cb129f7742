"""Soak test of the ring protocol: a million checksummed batches through a small ring, leaks watched.

Two spawned producer processes write through the real ``LaneWriter`` (claim a free slot, fill it,
``publish`` with a checksum in the slot header) into a ring of ``--lanes`` x ``--slots`` slots of
one small int32 field (``--rows`` x ``--cols``); the consumer in this process takes and releases
them through the real ``LaneReader`` of ``ringload/_lanes.py``, verifying each batch in between. Stream batch ``k``
goes to lane ``k % lanes`` as chunk ``k``; its payload is a seeded function of ``k`` and its
checksum a CRC32 of the payload seeded with ``k``, so the consumer, checking every batch in
stream order, catches a torn batch (checksum), a stale or repeated one (payload and stamp), and a
missing or reordered one (chunk number).

Every ``--sample-every`` batches it samples VmRSS (``/proc/PID/status``) and the number of open
file descriptors (``/proc/PID/fd``) of every process, prints them, and at the end checks that they
stayed flat: each process's final RSS within ``--rss-slack-mib`` of its first sample, and its
descriptor count equal to the first sample's. Exit code 1 on any bad batch or drift.

Every shared object (the ring and its semaphores) is removed at the end, also after Ctrl-C,
SIGTERM or a failure. Run from the repository root (10-20 s on 2 cores)::

    python -m tests.engines.soak                    # 1,000,000 batches, 2 lanes x 4 slots, 4 x 16 int32
    python -m tests.engines.soak --batches 200000 --sample-every 20000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import numpy as np
import posix_ipc

from ringload._lanes import LaneReader, LaneWriter, Semaphores, unlink_semaphores
from ringload._layout import Field, Geometry, Ring
from ringload._names import list_ring_names, list_semaphore_rings, shm_name
from ringload._types import Cursor

MIB = 1 << 20


def payload(k: int, shape: tuple[int, int]) -> np.ndarray:
    """Batch ``k``'s contents: cheap, and different for every k (so a stale slot never matches)."""
    base = np.uint32((k * 0x9E3779B1 + 0x5EED) & 0xFFFFFFFF)
    mixed = np.arange(shape[0] * shape[1], dtype=np.uint32) * np.uint32(0x27D4EB2F) ^ base
    return mixed.view(np.int32).reshape(shape)


def checksum(k: int, array: np.ndarray) -> int:
    """CRC32 of the batch's bytes, seeded with its stream number."""
    return zlib.crc32(array.tobytes(), zlib.crc32(k.to_bytes(8, "little")))


def produce(name: str, lane: int, lanes: int, total: int, done: Connection) -> None:
    """Producer process: publish stream batches ``lane, lane + lanes, ...`` below ``total`` into its lane,
    then keep everything open until ``done`` says the consumer has taken its last sample."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the consumer cleans up and ends the producers
    ring = Ring.attach(name)
    sems = Semaphores(name, ring.geometry.lanes)
    writer = LaneWriter(ring, sems, lane)
    parent = os.getppid()
    shape = ring.geometry.fields[0].shape
    for k in range(lane, total, lanes):
        seq = writer.claim(lambda: os.getppid() == parent)
        array = payload(k, shape)
        writer.views[seq % writer.slots]["x"][...] = array
        writer.publish(seq, k, seq, shape[0], True, Cursor(), shape[0], array.size, checksum=checksum(k, array))
    done.recv()
    del writer
    sems.close()
    ring.close()


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    batches: int
    seconds: float
    rss: dict[str, int]
    fds: dict[str, int]


@dataclass
class Consumer:
    """The consumer end of every lane through the shipped ``LaneReader``, verifying each batch."""

    ring: Ring
    sems: Semaphores
    producers: list[BaseProcess]
    empty_waits: int = 0  # times the due lane had nothing published yet (the consumer slept)
    readers: list[LaneReader] = field(init=False)
    views: list[list[np.ndarray]] = field(init=False)

    def __post_init__(self) -> None:
        g = self.ring.geometry
        self.readers = [LaneReader(self.ring, self.sems, lane) for lane in range(g.lanes)]
        self.views = [[self.ring.slot_arrays(lane, j)["x"] for j in range(g.slots)] for lane in range(g.lanes)]

    @property
    def absorbed(self) -> int:
        """Surplus `filled` tokens the counters did not back (only a repair leaves them)."""
        return sum(reader.absorbed for reader in self.readers)

    def wait_take(self, k: int, lane: int) -> int:
        """Take the lane's next batch, sleeping if there is none yet; fail if a producer died."""
        reader = self.readers[lane]
        seq = reader.take()
        if seq is not None:
            return seq
        self.empty_waits += 1
        while (seq := reader.take(1.0)) is None:
            dead = [p.name for p in self.producers if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"waiting for batch {k}: producer(s) {dead} died")
        return seq

    def take(self, k: int) -> None:
        """Take stream batch ``k`` from its lane, verify it and give its slot back."""
        lanes, slots = self.ring.geometry.lanes, self.ring.geometry.slots
        lane = k % lanes
        seq = self.wait_take(k, lane)
        reader = self.readers[lane]
        header = reader.header(seq)
        problems = []
        if seq != k // lanes:
            problems.append(f"lane sequence number {seq} (a missing or repeated batch)")
        if header.chunk != k:
            problems.append(f"chunk {header.chunk} (a missing, repeated or reordered batch)")
        array = self.views[lane][seq % slots]
        if header.checksum != checksum(k, array):
            problems.append("a checksum that does not match the slot (a torn batch)")
        if not np.array_equal(array, payload(k, array.shape)):
            problems.append("a payload that is not batch k's")
        if problems:
            raise AssertionError(f"batch {k} (lane {lane}, seq {seq}) has " + "; ".join(problems))
        reader.release(seq)


def sample(batches: int, started: float, processes: dict[str, int]) -> Sample:
    return Sample(batches, time.monotonic() - started, {n: vm_rss(pid) for n, pid in processes.items()},
                  {n: open_fds(pid) for n, pid in processes.items()})


def print_sample(s: Sample, names: list[str]) -> None:
    cells = "  ".join(f"{s.rss[n] / MIB:8.1f} {s.fds[n]:4d}" for n in names)
    print(f"{s.batches:>10,}  {s.seconds:7.1f}  {cells}", flush=True)


def drift(first: Sample, last: Sample, rss_slack: int) -> list[str]:
    """What grew between the first and the last sample beyond what is allowed."""
    found = []
    for n in first.rss:
        grew = last.rss[n] - first.rss[n]
        if grew > rss_slack:
            found.append(f"{n}: RSS grew by {grew / MIB:.1f} MiB (allowed {rss_slack / MIB:.1f})")
        if last.fds[n] != first.fds[n]:
            found.append(f"{n}: open file descriptors went from {first.fds[n]} to {last.fds[n]}")
    return found


def remove_ring(name: str, lanes: int) -> None:
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
    except posix_ipc.ExistentialError:
        pass
    unlink_semaphores(name, lanes)


def run(args: argparse.Namespace, name: str) -> int:
    geometry = Geometry(args.lanes, args.slots, args.rows, (Field("x", np.dtype("<i4"), (args.rows, args.cols)),))
    ring = Ring.create(name, geometry, {"soak": name})
    sems = Semaphores(name, args.lanes, args.slots)
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(args.lanes)]
    producers = [context.Process(target=produce, args=(name, lane, args.lanes, args.batches, pipes[lane][1]),
                                 name=f"producer-{lane}", daemon=True) for lane in range(args.lanes)]
    consumer = None
    try:
        for p in producers:
            p.start()
        consumer = Consumer(ring, sems, producers)
        processes = {"consumer": os.getpid(), **{p.name: p.pid for p in producers}}
        names = list(processes)
        print(f"ring {name}: {args.lanes} lanes x {args.slots} slots of {args.rows}x{args.cols} int32, "
              f"{args.batches:,} batches; per process: RSS MiB, open fds", flush=True)
        print(f"{'batches':>10}  {'s':>7}  " + "  ".join(f"{n:>13}" for n in names), flush=True)
        samples: list[Sample] = []
        started = time.monotonic()
        for k in range(args.batches):
            consumer.take(k)
            if (k + 1) % args.sample_every == 0 and k + 1 < args.batches:
                samples.append(sample(k + 1, started, processes))
                print_sample(samples[-1], names)
        elapsed = time.monotonic() - started
        samples.append(sample(args.batches, started, processes))  # the producers wait for this one
        print_sample(samples[-1], names)
        for (tell, _), p in zip(pipes, producers):
            tell.send(b"done")
            p.join(30)
        failures = [f"{p.name} exited with code {p.exitcode}" for p in producers if p.exitcode != 0]
        failures += drift(samples[0], samples[-1], int(args.rss_slack_mib * MIB)) if len(samples) > 1 else []
        print(f"{args.batches:,} batches verified in {elapsed:.1f} s ({args.batches / elapsed:,.0f}/s); the consumer "
              f"found the due lane empty {consumer.empty_waits:,} times; {consumer.absorbed} surplus tokens absorbed")
        for failure in failures:
            print("FAILED:", failure)
        if not failures:
            print(f"OK: no bad batch; RSS within {args.rss_slack_mib} MiB and open fds unchanged "
                  f"from {samples[0].batches:,} to {samples[-1].batches:,} batches in every process")
        return 1 if failures else 0
    finally:
        for p in producers:
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(10)
        for ends in pipes:
            for end in ends:
                end.close()
        if consumer is not None:
            consumer.views.clear()
        sems.close()
        ring.close()
        remove_ring(name, args.lanes)
        left = [n for n in (*list_ring_names(), *list_semaphore_rings()) if n == name]
        if left:
            print(f"WARNING: shared objects of ring {name} are still in /dev/shm", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=1_000_000, help="batches through the ring (default 1,000,000)")
    parser.add_argument("--lanes", type=int, default=2, help="producer processes, one lane each (default 2)")
    parser.add_argument("--slots", type=int, default=4, help="slots per lane (default 4)")
    parser.add_argument("--rows", type=int, default=4, help="rows of the int32 field (default 4)")
    parser.add_argument("--cols", type=int, default=16, help="columns of the int32 field (default 16)")
    parser.add_argument("--sample-every", type=int, default=100_000, help="batches between samples (default 100,000)")
    parser.add_argument("--rss-slack-mib", type=float, default=5.0,
                        help="allowed RSS growth of a process from the first sample to the last (default 5)")
    args = parser.parse_args()
    if args.batches < args.lanes or args.sample_every < 1:
        parser.error("--batches must be at least --lanes, and --sample-every at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up as after Ctrl-C
    try:
        return run(args, f"soak-{os.getpid()}")
    except KeyboardInterrupt:
        print("interrupted; shared objects removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
