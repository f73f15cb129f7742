"""Ring.attach against corrupt, truncated, foreign and badly-permissioned shared-memory objects.

A valid ring's bytes are copied, mutated, and written into a fresh shared-memory object
(mode 0600, the ring name scheme of ``ringload._names``) so that ``Ring.attach(name)`` reads them.
Whatever the bytes, attach must either raise ``RingError`` or return a ring whose every slot
view and control word lies inside the mapping: never another exception, never a view outside.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
from collections import Counter
from math import prod

import numpy as np
import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _ringtools as rt  # pytest puts tests/ on sys.path

from ringload import RingError
from ringload._layout import (
    ALLOWED_DTYPES,
    LANE_BLOCK,
    LINE,
    MAGIC,
    RECIPE_OFFSET,
    SCHEMA_OFFSET,
    SLOT_HEADER_SIZE,
    Field,
    Geometry,
    Ring,
)
from ringload._names import shm_name

TEMPLATE_GEOMETRY = Geometry(2, 3, 4, (
    Field("input_ids", np.dtype("<i4"), (4, 16)),
    Field("labels", np.dtype("<i8"), (4, 16)),
    Field("mask", np.dtype("|b1"), (4, 16)),
    Field("weight", np.dtype("<f4"), (4,)),
    Field("pos", np.dtype("<u2"), (4, 3, 5)),
))
TEMPLATE_RECIPE = {"task": "mlm", "batch_size": 4, "note": "template for header fuzzing"}

# Identity line: name -> (byte offset, struct format); see ringload._layout._IDENTITY.
IDENTITY = {
    "version": (8, "<I"), "header_size": (12, "<I"), "total_size": (16, "<Q"), "lanes": (24, "<I"),
    "slots": (28, "<I"), "slot_size": (32, "<Q"), "lanes_offset": (40, "<Q"), "slots_offset": (48, "<Q"),
    "fields": (56, "<H"), "ranks": (58, "<H"), "batch_size": (60, "<I"),
}
# Schema entry (64 bytes each, at SCHEMA_OFFSET): numeric members.
SCHEMA = {"ndim": (32, "<I"), "d0": (36, "<I"), "d1": (40, "<I"), "d2": (44, "<I"), "offset": (48, "<Q"),
          "nbytes": (56, "<Q")}
SPECIALS = [0, 1, 2, 3, 7, 8, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 4097, 2**16, 2**16 + 1, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
JUNK_DTYPES = [b">i4", b"<i16", b"|O", b"O", b"|V8", b"<U4", b"<c8", b"<M8", b"xx", b"", b"<i4\x00x", b"\xff\xfe"]

@pytest.fixture(scope="module")
def template() -> bytes:
    name = rt.unique_name()
    try:
        ring = Ring.create(name, TEMPLATE_GEOMETRY, TEMPLATE_RECIPE)
        image = bytes(ring._mem)
        ring.close()
    finally:
        rt.remove_ring(name, TEMPLATE_GEOMETRY.lanes)
    assert not rt.shm_entries(name)
    return image


@contextlib.contextmanager
def installed(image: bytes, mode: int = 0o600, uid: int | None = None):
    """Put ``image`` in a fresh shared-memory object named like a ring; yield the ring name; unlink it."""
    name = rt.unique_name()
    shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=0o600, size=len(image))
    try:
        try:
            if image:
                os.pwrite(shm.fd, image, 0)
            if mode != 0o600:
                os.fchmod(shm.fd, mode)
            if uid is not None:
                os.fchown(shm.fd, uid, -1)
        finally:
            shm.close_fd()
        yield name
    finally:
        posix_ipc.unlink_shared_memory(shm_name(name))
        assert not rt.shm_entries(name)


def check_views_inside(ring: Ring, image_size: int) -> None:
    """Every field view of every slot, and every control word, lies inside the mapping (and inside its slot)."""
    address, size = rt.mapping_address(ring)
    assert size == image_size == ring.total_size
    g = ring.geometry
    assert len(g.fields) >= 1 and g.lanes >= 1 and g.slots >= 2
    assert (ring.lane_word(g.lanes - 1, LANE_BLOCK // 8 - 1) + 1) * 8 <= ring.slots_offset
    assert len(ring.words) * 8 == size
    for lane in range(g.lanes):
        for slot in range(g.slots):
            lo, hi = rt.slot_bounds(ring, lane, slot)
            assert ring.slots_offset <= lo and hi <= size
            assert (ring.slot_word(lane, slot, SLOT_HEADER_SIZE // 8 - 1) + 1) * 8 <= hi
            arrays = ring.slot_arrays(lane, slot)
            by_name = {f.name: f for f in g.fields}  # a hostile header may repeat a name: the last one wins
            assert list(arrays) == list(by_name)
            for key, arr in arrays.items():
                field = by_name[key]
                start = arr.__array_interface__["data"][0] - address
                assert arr.nbytes == field.nbytes == prod(field.shape) * arr.itemsize
                assert 0 <= lo + SLOT_HEADER_SIZE <= start and start + arr.nbytes <= hi <= size, (
                    f"lane {lane} slot {slot} field {field.name}: [{start}, {start + arr.nbytes}) "
                    f"outside slot [{lo}, {hi})")
                assert start % LINE == 0
            del arrays
    ring.error  # bounded read of the error text


def attach_outcome(image: bytes) -> str:
    """'attached' (views checked) or 'refused' (RingError); any other exception propagates."""
    with installed(image) as name:
        try:
            ring = Ring.attach(name)
        except RingError:
            return "refused"
        try:
            check_views_inside(ring, len(image))
        finally:
            ring.close()
        return "attached"


# -- mutations -------------------------------------------------------------------------------

values = st.one_of(
    st.tuples(st.just("abs"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("delta"), st.integers(-1024, 1024)),
    st.tuples(st.just("special"), st.sampled_from(SPECIALS)),
    st.tuples(st.just("mul64"), st.integers(0, 1024)),
    st.tuples(st.just("scale"), st.integers(0, 16)),
)


def _new_value(current: int, spec: tuple[str, int], fmt: str) -> int:
    kind, raw = spec
    value = {"abs": raw, "delta": current + raw, "special": raw, "mul64": raw * 64, "scale": current * raw // 4}[kind]
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    return min(max(value, 0), top)


def _poke(buf: bytearray, offset: int, fmt: str, spec: tuple[str, int]) -> None:
    if offset + struct.calcsize(fmt) <= len(buf):
        (current,) = struct.unpack_from(fmt, buf, offset)
        struct.pack_into(fmt, buf, offset, _new_value(current, spec, fmt))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, SCHEMA_OFFSET + 8 * LINE - 1), st.integers(1, 255)),
    st.tuples(st.just("bytes"), st.integers(0, RECIPE_OFFSET + 8), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("ident"), st.sampled_from(sorted(IDENTITY)), values),
    st.tuples(st.just("schema"), st.integers(0, 7), st.sampled_from(sorted(SCHEMA)), values),
    st.tuples(st.just("dtype"), st.integers(0, 7),
              st.one_of(st.sampled_from([d.encode() for d in ALLOWED_DTYPES] + JUNK_DTYPES), st.binary(max_size=8))),
    st.tuples(st.just("name"), st.integers(0, 7), st.binary(max_size=24)),
    st.tuples(st.just("reshape"), st.integers(0, 7), st.lists(st.integers(1, 80), min_size=1, max_size=3),
              st.sampled_from([d.encode() for d in ALLOWED_DTYPES])),
    st.tuples(st.just("resize"), st.one_of(st.integers(-4160, 4160), st.integers(-(2**15), 2**15)), st.booleans()),
    st.tuples(st.just("recipe_len"), values),
)


def _write(buf: bytearray, at: int, data: bytes) -> None:
    """Overwrite in place; a write past the end of a truncated image is dropped (never grows it)."""
    if at + len(data) <= len(buf):
        buf[at:at + len(data)] = data


def apply(image: bytes, mutations: list[tuple]) -> bytes:
    buf = bytearray(image)
    for m in mutations:
        kind = m[0]
        if kind == "flip":
            _, pos, mask = m
            if pos < len(buf):
                buf[pos] ^= mask
        elif kind == "bytes":
            _, pos, data = m
            _write(buf, pos, data[: max(0, len(buf) - pos)])
        elif kind == "ident":
            offset, fmt = IDENTITY[m[1]]
            _poke(buf, offset, fmt, m[2])
        elif kind == "schema":
            offset, fmt = SCHEMA[m[2]]
            _poke(buf, SCHEMA_OFFSET + m[1] * LINE + offset, fmt, m[3])
        elif kind == "dtype":
            _write(buf, SCHEMA_OFFSET + m[1] * LINE + 24, m[2].ljust(8, b"\0")[:8])
        elif kind == "name":
            _write(buf, SCHEMA_OFFSET + m[1] * LINE, m[2].ljust(24, b"\0"))
        elif kind == "reshape":
            # A self-consistent entry (ndim, dims, nbytes agree), to get past the shallow checks.
            _, i, dims, dtype = m
            at = SCHEMA_OFFSET + i * LINE
            if at + LINE <= len(buf):
                padded = list(dims) + [0] * (3 - len(dims))
                nbytes = prod(dims) * np.dtype(dtype.decode()).itemsize
                struct.pack_into("<8sIIIIQQ", buf, at + 24, dtype, len(dims), *padded,
                                 struct.unpack_from("<Q", buf, at + 48)[0], nbytes)
        elif kind == "resize":
            _, delta, fix_total = m
            new_len = max(0, len(buf) + delta)
            buf = buf[:new_len] + bytearray(max(0, new_len - len(buf)))
            if fix_total and new_len >= 24:
                struct.pack_into("<Q", buf, 16, new_len)
        elif kind == "recipe_len":
            _poke(buf, RECIPE_OFFSET, "<I", m[1])
    return bytes(buf)


def test_mutated_headers_never_give_out_of_bounds_views(template):
    """Random flips, overwrites, schema rewrites, resizes: attach raises RingError or every view is in bounds."""
    outcomes: Counter = Counter()

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutations=st.lists(mutation, min_size=1, max_size=5))
    def run(mutations):
        outcomes[attach_outcome(apply(template, mutations))] += 1

    run()
    # The fuzzer must reach both outcomes, or it proves nothing about one of them.
    assert outcomes["refused"] > 0 and outcomes["attached"] > 0, outcomes


@settings(max_examples=150, deadline=None, database=None)
@given(lanes=st.integers(1, 4), slots=st.integers(2, 6), batch=st.integers(1, 5),
       shapes=st.lists(st.tuples(st.sampled_from(ALLOWED_DTYPES), st.lists(st.integers(1, 9), max_size=2)),
                       min_size=1, max_size=8),
       data=st.data())
def test_geometry_fields_mutated_after_create(lanes, slots, batch, shapes, data):
    """Random geometries attach cleanly; one overwritten identity or schema number still gives in-bounds views."""
    fields = tuple(Field(f"f{i}", np.dtype(d), (batch, *dims)) for i, (d, dims) in enumerate(shapes))
    geometry = Geometry(lanes, slots, batch, fields)
    name = rt.unique_name()
    try:
        ring = Ring.create(name, geometry, {"g": name})
        image = bytes(ring._mem)
        ring.close()
    finally:
        rt.remove_ring(name, lanes)
    assert attach_outcome(image) == "attached"
    with installed(image) as copy:
        ring = Ring.attach(copy)
        assert ring.geometry == geometry
        ring.close()
    if data.draw(st.booleans()):
        which = data.draw(st.sampled_from(sorted(IDENTITY)))
        mutated = apply(image, [("ident", which, data.draw(values))])
    else:
        i = data.draw(st.integers(0, len(fields)))
        mutated = apply(image, [("schema", i, data.draw(st.sampled_from(sorted(SCHEMA))), data.draw(values))])
    assert attach_outcome(mutated) in ("attached", "refused")


# -- specific refusals -----------------------------------------------------------------------

def test_unmodified_copy_attaches(template):
    """The harness itself: an unmodified copy of a valid ring attaches with its geometry and in-bounds views."""
    with installed(template) as name:
        ring = Ring.attach(name)
        try:
            assert ring.geometry == TEMPLATE_GEOMETRY
            assert ring.recipe() == TEMPLATE_RECIPE
            check_views_inside(ring, len(template))
        finally:
            ring.close()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620, 0o666, 0o701, 0o710])
def test_group_or_other_access_is_refused(template, mode):
    """A ring readable or writable by anyone but its owner (e.g. 0644) is refused, naming the mode."""
    with installed(template, mode=mode) as name:
        with pytest.raises(RingError, match=f"mode {mode:o}.*0600"):
            Ring.attach(name)


@pytest.mark.skipif(os.getuid() != 0, reason="changing an object's owner needs root")
def test_foreign_owner_is_refused(template):
    """An object owned by another uid is refused even with mode 0600."""
    with installed(template, uid=os.getuid() + 4242) as name:
        with pytest.raises(RingError, match="belongs to uid"):
            Ring.attach(name)


@pytest.mark.parametrize("magic", [b"NOTARING", b"\0" * 8, b"ringload", MAGIC[:7] + b"!"])
def test_foreign_object_is_refused_mentioning_the_header(template, magic):
    """A shm object without the RINGLOAD magic (foreign, or still being created) is refused with a 'header' message."""
    image = magic + template[8:]
    with installed(image) as name:
        with pytest.raises(RingError, match="header"):
            Ring.attach(name)


def test_random_foreign_bytes_are_refused_mentioning_the_header():
    """A large object full of unrelated bytes is refused as a foreign header."""
    rng = np.random.default_rng(7)
    with installed(rng.integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()) as name:
        with pytest.raises(RingError, match="header"):
            Ring.attach(name)


@pytest.mark.parametrize("size", [0, 1, 8, 63, 64, 512, RECIPE_OFFSET, RECIPE_OFFSET + 3])
def test_too_small_object_is_refused(template, size):
    """An object too small to hold a header is refused before it is mapped or parsed."""
    with installed(template[:size]) as name:
        with pytest.raises(RingError, match="too small"):
            Ring.attach(name)


@pytest.mark.parametrize("cut", [1, 8, 64, 4096, None])
def test_truncated_ring_is_refused(template, cut):
    """A ring cut short is refused, whether or not its header's total_size was rewritten to match."""
    cut = cut or len(template) - 4096 * 2  # leaves only the header page and the lane blocks
    image = template[:-cut]
    with installed(image) as name:
        with pytest.raises(RingError, match="corrupt or foreign header"):
            Ring.attach(name)
    # Cut to whole cache lines and total_size rewritten to agree: the slots no longer fit.
    cut_lines = -(-cut // LINE) * LINE
    image = bytearray(template[:-cut_lines])
    struct.pack_into("<Q", image, 16, len(image))
    with installed(bytes(image)) as name:
        with pytest.raises(RingError, match="slots extend past the end"):
            Ring.attach(name)


def test_missing_ring_and_invalid_names_are_refused():
    """Attaching to a ring that does not exist, or to a name that is not a safe POSIX object name, raises RingError."""
    with pytest.raises(RingError, match="no ring named"):
        Ring.attach(rt.unique_name())
    for bad in ["", "../etc", "a/b", ".hidden", "x" * 64, "a..b", "sp ace"]:
        with pytest.raises(RingError, match="invalid ring name"):
            Ring.attach(bad)


@pytest.mark.parametrize("extra", [1, 4, 7, 8, 63])
def test_odd_sized_mapping_is_refused(template, extra):
    """A header agreeing with a mapping of odd length gives RingError (or a safe mapping), never TypeError."""
    image = bytearray(template) + bytearray(extra)
    struct.pack_into("<Q", image, 16, len(image))
    with installed(bytes(image)) as name:
        try:
            ring = Ring.attach(name)
        except RingError:
            return
        try:
            check_views_inside(ring, len(image))
        finally:
            ring.close()


_OTHER_USER = """
import os, sys
from ringload import RingError
from ringload._layout import Ring
from ringload._lanes import Semaphores
os.setgid(65534)
os.setuid(65534)
for what, attach in (("ring", lambda: Ring.attach(sys.argv[1])), ("semaphores", lambda: Semaphores(sys.argv[1], 1))):
    try:
        attach()
        print(what, "attached")
    except RingError as exc:
        print(what, "RingError", exc)
    except Exception as exc:
        print(what, type(exc).__module__ + "." + type(exc).__name__, exc)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a process as another user")
def test_other_users_ring_is_refused_with_ring_error():
    """A non-root user attaching to another user's ring or semaphores gets RingError, not PermissionsError."""
    import subprocess

    from ringload._lanes import Semaphores

    name = rt.unique_name()
    try:
        ring = Ring.create(name, rt.small_geometry(1, 2), {})
        Semaphores(name, 1, 2).close()
        ring.close()
        result = subprocess.run([sys.executable, "-c", _OTHER_USER, name], capture_output=True, text=True, timeout=60)
    finally:
        rt.remove_ring(name, 1)
    assert not rt.shm_entries(name)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("ring RingError") and "belongs to" in lines[0], lines[0]
    assert lines[1].startswith("semaphores RingError") and "another user" in lines[1], lines[1]
