"""Side-by-side throughput benchmark: ringload against the tokenizer bound and two baselines.

Every contender runs the same job: ``--mb`` MB of jsonl made from the KJV verses
(``kjv`` asset), the ``bert-wordpiece`` tokenizer (truncation and padding off),
masked-LM batches of 32 x 128 (15% masking, 80/10/10) and ``P`` worker or
producer processes. ``--corpus`` picks the documents' sizes:

* ``kjv``: one verse per document (all short and alike);
* ``skewed``: documents of consecutive verses with log-normal sizes (median about
  one verse, a long tail to ~100 KB) and three build logs of 2.5-6 MB (timestamps,
  paths, hashes: about 2.3 tokens per byte more than prose, ~10 s to tokenize 8 MB
  in one call), as real corpora have;
* ``giant-first``: ``skewed`` with a 4 MB build log as the very first record.

``--tokenizer gpt2 --task clm`` runs causal-LM batches (32 x 128, documents packed
back to back) with the ``gpt2-bpe`` tokenizer instead (saved as a ``tokenizer.json``
that (a) and (b) both load); the baselines (c), (d) do masked-LM only, so skip them.
``--engine auto,tokenizers`` runs ringload once per ``tokenizer_engine`` (default: auto
only): with GPT-2, auto encodes with tiktoken (see README, "Tokenizer engines").

``--slots`` runs ringload again with that many slots per producer (a small value,
as a user may set). Each corpus gets its own tokenizer bound, so every ringload
row is a ratio to the bound on the same text, measured in the same run:

(a) ``tokenizer``: the bound. ``Tokenizer.encode_batch_fast`` (what ringload's
    producers call) over 1000-line chunks of pre-loaded texts in P spawned processes,
    no I/O, no packing; tokens/s in total (the sum of the processes' own rates, i.e.
    with the work perfectly balanced between them). ``--encode batch`` uses ``encode_batch``
    (with character offsets, ~25% slower) here and in (c).
(b) ``ringload``: ``ringload.start`` (daemon) + ``ringload.connect``, end to end.
(c) ``handmade``: a tuned ``IterableDataset`` under ``DataLoader(num_workers=P)``
    (see ``_baselines.py``).
(d) ``hf``: ``datasets`` streaming + ``group_texts`` + ``DataCollatorForLanguageModeling``
    under ``DataLoader(num_workers=P)``, the corpus split into P files.

For (b)-(d), each measurement runs in a fresh process that plays the training
loop (the consumer: it only reads each batch's ``attention_mask``) and reports:

* tokens/s (steady state): ``attention_mask`` tokens delivered per second, timed
  from 1 s after the first batch (so that anything buffered during start-up has
  drained) for ``--seconds``, or until 80% of the corpus has been delivered --
  the rest keeps data flowing for the next step;
* end-to-end tokens/s: every token delivered over the time since the pipeline
  was started, start-up included;
* time to first batch, from just before the pipeline is started (worker and
  daemon start-up included, library imports not);
* consumer cost per batch: the time spent inside ``next()`` when data is
  already waiting -- after each of 5 pauses of 1 s, a burst of 2P ``next()``
  calls (2P is what a default DataLoader holds ready);
* peak RSS (VmHWM) of the consumer and of every process below it (workers;
  for ringload its daemon, its producers and their resource tracker).

Every row also shows ``other``: the share of the machine's CPU time that processes
outside the benchmark used while it ran. On a shared machine, trust rows near 0%.

``TOKENIZERS_PARALLELISM`` defaults to false so that each process encodes on one
thread and P is the parallelism of every contender. Loaders count the special
tokens they deliver, the bound does not (about 5% more on KJV verses).

Run from the repository root (assets are fetched on first use; about 2 minutes
on 2 cores with the defaults)::

    python scripts/bench.py                          # P=2, 100 MB, 20 s per contender
    python scripts/bench.py --producers 1,2,4 --skip hf --json bench.json
    python scripts/bench.py --corpus kjv,skewed,giant-first --slots 8 --skip hf,handmade
    python scripts/bench.py --tokenizer gpt2 --task clm --engine auto,tokenizers --skip hf,handmade

With several P values, (a) and (b) run at each; (c) and (d) at the first only, on
the first corpus.

``--cache-epochs N`` runs the token-cache benchmark instead: ringload on the first corpus
with ``epochs: N`` three times, in one process, one after the other: with ``token_cache:
false``, then with a token cache in a fresh directory, then again on that cache (a rerun
of the recipe). Each run reports every epoch's tokens/s (from the epoch's first batch to
the next epoch's first batch, or the last batch) and its ratio to the same run's epoch 1,
and whether every batch (CRC32 of all its fields) equals the uncached run's::

    python scripts/bench.py --cache-epochs 3 --mb 40
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetch_assets import fetch  # sibling module in scripts/
from tokenizers import Tokenizer

if TYPE_CHECKING:
    from _baselines import Batch, Opener

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = {
    "tokenizer": "(a) tokenizer bound",
    "ringload": "(b) ringload",
    "handmade": "(c) hand-made DataLoader",
    "hf": "(d) HF datasets streaming",
}
BATCH_SIZE = 32
SEQ_LEN = 128
MASK_PROB = 0.15
SEED = 0
ENCODERS = {"batch": "encode_batch", "fast": "encode_batch_fast"}
TOKENIZERS = ("bert", "gpt2")
TASKS = ("mlm", "clm")
ENGINES = ("auto", "tokenizers", "tiktoken")  # ringload's tokenizer_engine
CORPORA = ("kjv", "skewed", "giant-first")
GIANT_BYTES = (4_000_000, 2_500_000, 6_000_000)  # the skewed corpus's multi-MB documents
LOGNORMAL_SIGMA = 1.6  # of a skewed document's size in verses (median one verse)
ENCODE_CHUNK = 1000  # lines per encode_batch call: amortises the Python-Rust crossing
WARMUP_S = 1.0
CORPUS_SHARE = 0.8  # of the corpus timed; the rest keeps data flowing for the next() bursts
BURST_ROUNDS = 5
SETTLE_S = 1.0
START_TIMEOUT_S = 180.0  # on top of --seconds, for start-up, bursts and teardown

Json = dict[str, Any]


@dataclass(frozen=True)
class Corpus:
    kind: str
    path: Path
    shards: tuple[Path, ...]  # the same lines, round-robin over P files, for (d)
    docs: int
    nbytes: int
    tokens: int  # without special tokens


@dataclass(frozen=True)
class Job:
    contender: str
    producers: int
    corpus: Corpus
    tokenizer: Path
    encode: str  # Tokenizer method for (a) and (c): encode_batch or encode_batch_fast
    seconds: float
    slots: int | None = None  # ringload's slots per producer (None: its default)
    task: str = "mlm"
    engine: str = "auto"  # ringload's tokenizer_engine


@dataclass
class Result:
    contender: str
    producers: int
    status: str  # ok | unavailable | error
    corpus: str = "kjv"
    slots: int | None = None
    engine: str | None = None  # ringload's tokenizer_engine
    error: str | None = None
    tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None  # steady state, after the warm-up
    end_to_end_tokens_per_s: float | None = None  # all delivered tokens / time since start
    first_batch_s: float | None = None
    batch_shape: list[int] | None = None
    next_us_mean: float | None = None
    next_us_p50: float | None = None
    next_samples: int | None = None
    consumer_peak_mb: float | None = None
    workers: list[Json] = field(default_factory=list)
    vs_bound: float | None = None
    foreign_cpu: float | None = None  # share of the machine's CPU used by other work meanwhile


# --- processes and memory -------------------------------------------------

def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of ``pid`` in MiB, None once it is gone (or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, found through the parent ids in /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces or parentheses; fields follow the last ')'.
            children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        kids = children.get(stack.pop(), [])
        found += kids
        stack += kids
    return found


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:100]


def worker_memory() -> list[Json]:
    return [{"pid": pid, "peak_mb": mb, "cmd": command_line(pid)}
            for pid in descendants(os.getpid())
            if (mb := peak_rss_mb(pid)) is not None]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it (used only on a runner that hung)."""
    for victim in [*descendants(pid), pid]:
        with suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def cpu_counters() -> tuple[float, float, float]:
    """Seconds of (all CPUs' time, their busy time, CPU used by this process's reaped children).

    Children's CPU includes their own reaped descendants, so after a measurement has been
    joined the last value covers its whole process tree.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(fields) / hz
    return total, total - (fields[3] + fields[4]) / hz, children.ru_utime + children.ru_stime


def foreign_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of all CPU time between two ``cpu_counters`` readings used by other work."""
    total, busy, ours = (b - a for a, b in zip(before, after, strict=True))
    return max(0.0, busy - ours) / total if total > 0 else 0.0


# --- corpus ---------------------------------------------------------------

def bench_tokenizer(name: str, directory: Path) -> Path:
    """The tokenizer.json every contender loads: BERT's, or GPT-2's vocab.json + merges.txt saved as one
    (read by ringload's own loader, so the bound and ringload run the same tokenizer)."""
    if name == "bert":
        return fetch("bert-wordpiece") / "tokenizer.json"
    sys.path.insert(0, str(REPO_ROOT))
    from ringload._tasks.base import _load_bpe_folder

    path = directory / "gpt2-tokenizer.json"
    _load_bpe_folder(str(fetch("gpt2-bpe"))).save(str(path))
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    # The shipped tokenizer.json pads and truncates to 128; packing needs raw documents.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _documents(kind: str, verses: list[str], verse_tokens: list[int], megabytes: float) -> Iterator[tuple[str, int]]:
    """(text, tokens) of the corpus's documents: one verse each, or runs of consecutive verses of
    skewed sizes (WordPiece splits at whitespace, so a run's tokens are its verses' tokens), and the
    build logs (tokens -1: the caller counts them)."""
    target, size, at = int(megabytes * 1e6), 0, 0
    rng = random.Random(SEED)
    giants = {0: GIANT_BYTES[0]} if kind == "giant-first" else {}
    if kind != "kjv":  # spread the multi-MB documents over the corpus
        giants.update({int(target * share): n for share, n in zip((0.1, 0.45, 0.8), GIANT_BYTES)})
    pending = sorted(giants)
    while size < target:
        if pending and size >= pending[0]:
            log = _build_log(giants[pending.pop(0)], rng)
            size += len(log) + 1
            yield log, -1  # tokens counted by the caller
            continue
        if kind == "kjv":
            want = 1
        else:
            want = min(100_000, int(rng.lognormvariate(0, LOGNORMAL_SIGMA) * 150))
        parts, length, tokens = [], 0, 0
        while length < want or not parts:
            parts.append(verses[at % len(verses)])
            length += len(parts[-1]) + 1
            tokens += verse_tokens[at % len(verses)]
            at += 1
        size += length
        yield " ".join(parts), tokens


def _build_log(nbytes: int, rng: random.Random) -> str:
    """A build log of about ``nbytes``: the kind of multi-MB document that is costly to tokenize."""
    lines, size = [], 0
    while size < nbytes:
        step = len(lines)
        line = (f"2026-11-26T02:{step // 60 % 60:02d}:{step % 60:02d}.{step % 997:03d}Z [INFO] step_{step}: compiling "
                f"/usr/src/app/module_{rng.randrange(99999)}.cpp -O2 --hash={rng.getrandbits(128):032x} ok")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def build_corpus(directory: Path, megabytes: float, tokenizer: Tokenizer, shard_count: int,
                 kind: str = "kjv") -> Corpus:
    """``megabytes`` MB of ``{"text": ...}`` lines made of KJV verses (see ``--corpus``), plus shards."""
    kjv = fetch("kjv") / "kjv.jsonl"
    with kjv.open(encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for line in f]
    verse_tokens = [len(e) for e in tokenizer.encode_batch(verses, add_special_tokens=False)]

    path = directory / f"corpus-{kind}.jsonl"
    shards = tuple(directory / f"shard-{kind}-{k}-of-{shard_count}.jsonl" for k in range(shard_count))
    docs = size = tokens = 0
    with ExitStack() as stack:
        out = stack.enter_context(path.open("w", encoding="utf-8"))
        shard_files = [stack.enter_context(p.open("w", encoding="utf-8")) for p in shards]
        for text, length in _documents(kind, verses, verse_tokens, megabytes):
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            if shard_files:
                shard_files[docs % len(shard_files)].write(line)
            size += len(line.encode())
            tokens += length if length >= 0 else len(tokenizer.encode(text, add_special_tokens=False).ids)
            docs += 1
    return Corpus(kind, path, shards, docs, size, tokens)


# --- (a) tokenizer bound --------------------------------------------------

def _encode_worker(rank: int, job: Job, barrier: Any, results: Any) -> None:
    tokenizer = load_tokenizer(job.tokenizer)
    with job.corpus.path.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f)
                 if i % job.producers == rank]
    encode = getattr(tokenizer, job.encode)
    barrier.wait()  # time encoding only, not interpreter start-up or reading
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), ENCODE_CHUNK):
        encodings = encode(texts[i:i + ENCODE_CHUNK], add_special_tokens=False)
        tokens += sum(len(e) for e in encodings)
        if time.perf_counter() - start >= job.seconds:
            break
    elapsed = time.perf_counter() - start
    results.put((tokens, elapsed, {"pid": os.getpid(), "peak_mb": peak_rss_mb(os.getpid()),
                                   "cmd": f"{job.encode} worker"}))


def _collect(results: Any, procs: list[Any], timeout: float) -> list[Any]:
    """One result per process; fails fast if one exits without reporting."""
    outcomes: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(outcomes) < len(procs):
        try:
            outcomes.append(results.get(timeout=1.0))
        except queue.Empty:
            if failed := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                raise RuntimeError(f"encode worker exited with code {failed[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"encode workers gave no result within {timeout:.0f} s") from None
    return outcomes


def tokenizer_bound(job: Job) -> Result:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(job.producers)
    results = ctx.Queue()
    procs = [ctx.Process(target=_encode_worker, args=(rank, job, barrier, results), daemon=True)
             for rank in range(job.producers)]
    for proc in procs:
        proc.start()
    try:
        outcomes = _collect(results, procs, job.seconds + START_TIMEOUT_S)
    except RuntimeError as exc:
        return Result(job.contender, job.producers, "error", error=str(exc))
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():  # a sibling died and left it waiting at the barrier
                proc.kill()
    tokens = sum(o[0] for o in outcomes)
    elapsed = max(o[1] for o in outcomes)  # the P workers start together at the barrier
    # The sum of the workers' own rates: the bound with the work perfectly balanced. (Dividing by the
    # slowest worker's time would charge the bound for a multi-MB document that one worker drew last.)
    rate = sum(o[0] / o[1] for o in outcomes)
    return Result(job.contender, job.producers, "ok", tokens=tokens, seconds=elapsed,
                  tokens_per_s=rate, workers=[o[2] for o in outcomes])


# --- (b)-(d): measured in a fresh consumer process -------------------------

def _ringload_opener(job: Job) -> Opener:
    # Let both this process and the daemon subprocess import ringload from this checkout.
    sys.path.insert(0, str(REPO_ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    import ringload

    if missing := [f for f in ("start", "connect") if not hasattr(ringload, f)]:
        raise ImportError(f"ringload has no {' or '.join(missing)} yet")
    recipe = {"name": "bench",
              "source": {"paths": [str(job.corpus.path)], "format": "jsonl", "field": "text"},
              "tokenizer": str(job.tokenizer),
              "task": ({"type": "mlm", "seq_len": SEQ_LEN, "mask_prob": MASK_PROB} if job.task == "mlm"
                       else {"type": "clm", "seq_len": SEQ_LEN}),
              "tokenizer_engine": job.engine,
              "batch_size": BATCH_SIZE, "producers": job.producers, "seed": SEED, "epochs": 1}
    if job.slots is not None:
        recipe["slots"] = job.slots
    name = f"bench-{os.getpid()}"

    @contextmanager
    def open_stream() -> Iterator[Iterator[Batch]]:
        with ringload.start(recipe, name=name), \
                ringload.connect(name, timeout=60) as loader:
            yield iter(loader)

    return open_stream


def _opener(job: Job) -> Opener:
    if job.contender == "ringload":
        return _ringload_opener(job)
    import _baselines

    task: dict[str, Any] = dict(producers=job.producers, batch_size=BATCH_SIZE,
                                seq_len=SEQ_LEN, mask_prob=MASK_PROB, seed=SEED)
    tokenizer = load_tokenizer(job.tokenizer)
    if job.contender == "handmade":
        return _baselines.handmade(job.corpus.path, tokenizer, encode=job.encode,
                                   chunk_lines=ENCODE_CHUNK, **task)
    return _baselines.hf_streaming(job.corpus.shards, tokenizer, **task)


def _tokens(batch: Batch) -> int:
    """Tokens in ``batch``; reading the mask is also how the consumer touches it."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _steady_state(stream: Iterator[Batch], job: Job, started: float, delivered: int,
                  result: Result) -> bool:
    """Consume for the throughput numbers, filling them into ``result``; True if the stream ended.

    The first WARMUP_S after the first batch are not timed, so that whatever the pipeline
    buffered during start-up has drained; then tokens are counted for ``job.seconds`` or
    until CORPUS_SHARE of the corpus has been delivered.
    """
    token_cap = CORPUS_SHARE * job.corpus.tokens
    t_first = now = time.perf_counter()
    window_start: float | None = None
    window_tokens = 0
    ended = False
    while now - t_first < WARMUP_S + job.seconds and delivered < token_cap:
        batch = next(stream, None)
        now = time.perf_counter()
        if batch is None:
            ended = True
            break
        tokens = _tokens(batch)
        delivered += tokens
        if window_start is not None:
            window_tokens += tokens
        elif now - t_first >= WARMUP_S:
            window_start = now
    result.end_to_end_tokens_per_s = delivered / (now - started)
    if window_start is None or now <= window_start:
        result.status, result.error = "error", "corpus used up during the warm-up; raise --mb"
    else:
        result.tokens, result.seconds = window_tokens, now - window_start
        result.tokens_per_s = window_tokens / result.seconds
    return ended


def _ready_next_costs(stream: Iterator[Batch], producers: int) -> list[int]:
    """Nanoseconds spent in each ``next()`` that finds its batch already waiting."""
    costs: list[int] = []
    for _ in range(BURST_ROUNDS):
        time.sleep(SETTLE_S)  # let the producers fill whatever they buffer
        for _ in range(2 * producers):
            t = time.perf_counter_ns()
            batch = next(stream, None)
            elapsed = time.perf_counter_ns() - t
            if batch is None:
                return costs
            costs.append(elapsed)
            _tokens(batch)
    return costs


def measure(open_stream: Opener, job: Job) -> Result:
    result = Result(job.contender, job.producers, "ok", corpus=job.corpus.kind, slots=job.slots,
                    engine=job.engine if job.contender == "ringload" else None)
    started = time.perf_counter()
    with open_stream() as stream:
        first = next(stream)
        result.first_batch_s = time.perf_counter() - started
        result.batch_shape = list(first["input_ids"].shape)
        ended = _steady_state(stream, job, started, _tokens(first), result)
        costs = [] if ended else _ready_next_costs(stream, job.producers)
        # Read before the context closes: the workers are gone afterwards.
        result.consumer_peak_mb = peak_rss_mb(os.getpid())
        result.workers = worker_memory()
    if costs:
        result.next_us_mean = statistics.fmean(costs) / 1e3
        result.next_us_p50 = statistics.median(costs) / 1e3
        result.next_samples = len(costs)
    return result


def _run_job(job: Job, start_method: str, conn: Connection) -> None:
    """Body of the consumer process: one contender, one measurement, result sent back."""
    # A spawned process defaults to spawn; give DataLoader the start method that a
    # training script launched from the shell gets on this platform.
    mp.set_start_method(start_method, force=True)
    try:
        open_stream = _opener(job)
    except ImportError as exc:
        conn.send(asdict(Result(job.contender, job.producers, "unavailable", corpus=job.corpus.kind, slots=job.slots,
                                error=str(exc))))
        return
    try:
        result = measure(open_stream, job)
    except Exception as exc:  # report any failure and let the other contenders run
        result = Result(job.contender, job.producers, "error", corpus=job.corpus.kind, slots=job.slots,
                        error=f"{type(exc).__name__}: {exc}")
    # A dict, not a Result: the class lives in __mp_main__ here but __main__ in the parent.
    conn.send(asdict(result))


def run_isolated(job: Job) -> Result:
    """Run one measurement in a fresh spawned process so none inherits another's state."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_job, args=(job, mp.get_start_method(), sender))
    proc.start()
    sender.close()
    try:
        if receiver.poll(job.seconds + START_TIMEOUT_S):
            return Result(**receiver.recv())
        return Result(job.contender, job.producers, "error",
                      error=f"no result within {job.seconds + START_TIMEOUT_S:.0f} s")
    except EOFError:
        proc.join()
        return Result(job.contender, job.producers, "error",
                      error=f"consumer process died (exit code {proc.exitcode})")
    finally:
        proc.join(timeout=30)
        if proc.is_alive() and proc.pid:
            kill_tree(proc.pid)
            proc.join()


# --- report ---------------------------------------------------------------

def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_row(r: Result) -> None:
    setting = f"{r.corpus}" + (f", slots {r.slots}" if r.slots else "") + (
        f", {r.engine}" if r.engine and r.engine != "auto" else "")
    label = f"{CONTENDERS[r.contender]:<27}{setting:<22}{r.producers:>3}"
    if r.status != "ok" and r.first_batch_s is None:
        print(f"{label}  {r.status}: {r.error}", flush=True)
        return
    peaks = [w["peak_mb"] for w in r.workers]
    workers = f"{len(peaks)} x {max(peaks):.0f}" if peaks else "-"
    print(f"{label}{_num(r.tokens_per_s, ',.0f'):>13}{_num(r.vs_bound, '.2f'):>8}"
          f"{_num(r.end_to_end_tokens_per_s, ',.0f'):>13}{_num(r.first_batch_s, '.2f'):>8}"
          f"{_num(r.next_us_mean, ',.0f'):>10}{_num(r.next_us_p50, ',.0f'):>9}"
          f"{_num(r.consumer_peak_mb, ',.0f'):>10}{workers:>14}{_num(r.foreign_cpu, '.0%'):>7}"
          f"{'  ' + r.error if r.error else ''}", flush=True)


HEADER = (f"{'contender':<27}{'corpus':<22}{'P':>3}{'tokens/s':>13}{'/bound':>8}{'e2e tok/s':>13}{'1st s':>8}"
          f"{'next us':>10}{'p50 us':>9}{'cons MB':>10}{'procs x MB':>14}{'other':>7}")


def ringload_ratios(results: list[Result], producers: int) -> dict[str, float | None]:
    """ringload's tokens/s divided by each other contender's, at ``producers``."""
    rates = {r.contender: rate for r in results
             if r.producers == producers and r.corpus == results[0].corpus and not r.slots
             and r.engine in (None, "auto") and (rate := r.tokens_per_s)}
    mine = rates.get("ringload")
    return {name: mine / rates[name] if mine and rates.get(name) else None
            for name in CONTENDERS if name != "ringload"}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("ringload", "torch", "tokenizers", "tiktoken", "numpy", "datasets", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- token cache: epochs after the first ------------------------------------

def cache_epochs(corpus: Corpus, tokenizer: Path, producers: int, epochs: int, task: str) -> Json:
    """Per-epoch rates of three runs (uncached, cached first run, cached rerun) and batch equality."""
    sys.path.insert(0, str(REPO_ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    import zlib

    import ringload

    recipe = {"name": "bench-cache",
              "source": {"paths": [str(corpus.path)], "format": "jsonl", "field": "text"},
              "tokenizer": str(tokenizer),
              "task": ({"type": "mlm", "seq_len": SEQ_LEN, "mask_prob": MASK_PROB} if task == "mlm"
                       else {"type": "clm", "seq_len": SEQ_LEN}),
              "batch_size": BATCH_SIZE, "producers": producers, "seed": SEED, "epochs": epochs}
    runs: list[Json] = []
    with tempfile.TemporaryDirectory(prefix="ringload-bench-cache-") as cache_dir:
        for label, cache in (("token_cache: false", False), ("cached, first run", {"dir": cache_dir}),
                             ("cached, rerun", {"dir": cache_dir})):
            name = f"bench-cache-{os.getpid()}"
            starts: list[float] = []
            tokens = [0] * epochs
            crcs: list[int] = []
            before = cpu_counters()
            with ringload.start({**recipe, "token_cache": cache}, name=name), \
                    ringload.connect(name, timeout=120) as loader:
                for batch in loader:
                    now = time.perf_counter()
                    if len(starts) <= loader.epoch:
                        starts.append(now)
                    tokens[loader.epoch] += _tokens(batch)
                    crc = 0
                    for key in sorted(batch):
                        crc = zlib.crc32(batch[key].numpy().tobytes(), crc)
                    crcs.append(crc)
                    if len(crcs) % 500 == 1:  # the reader's byte counts are final long before the last batch
                        status = ringload.ring_status(name)
                ends = [*starts[1:], time.perf_counter()]
            rates = [t / (e - s) for t, s, e in zip(tokens, starts, ends, strict=True)]
            runs.append({"run": label, "tokens_per_s": rates, "vs_epoch_1": [r / rates[0] for r in rates],
                         "batches": len(crcs), "identical_to_uncached": None if not runs else crcs == runs[0]["crcs"],
                         "source_bytes": status["source_bytes"], "foreign_cpu": foreign_share(before, cpu_counters()),
                         "crcs": crcs})
            row = "  ".join(f"{r:>12,.0f} ({r / rates[0]:.1f}x)" for r in rates)
            same = "" if len(runs) == 1 else f"  identical to uncached: {runs[-1]['identical_to_uncached']}"
            print(f"{label:<20} {row}  fetched {status['source_bytes']['fetched'] / 2**20:.1f} MiB, from cache "
                  f"{status['source_bytes']['from_cache'] / 2**20:.1f} MiB  other {runs[-1]['foreign_cpu']:.0%}{same}",
                  flush=True)
    for run in runs:
        del run["crcs"]
    return {"producers": producers, "epochs": epochs, "runs": runs}


# --- command line ---------------------------------------------------------

def _int_list(values: list[str]) -> list[int]:
    return [int(v) for item in values for v in item.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Throughput of ringload vs. the tokenizer bound, a hand-made "
                    "DataLoader pipeline and HF datasets streaming.")
    parser.add_argument("--producers", "-p", action="append", metavar="P[,P...]",
                        help="producer/worker processes; repeat or list for a scaling "
                             "table of (a) and (b); (c) and (d) use the first (default 2)")
    parser.add_argument("--mb", type=float, default=100.0,
                        help="corpus size in MB (default 100: on 2 cores, 20 MB lasts a fast "
                             "pipeline only ~3 s)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="time budget of each throughput measurement (default 20)")
    parser.add_argument("--skip", action="append", default=[], metavar="NAME[,NAME...]",
                        help=f"contenders to leave out: {', '.join(CONTENDERS)}")
    parser.add_argument("--encode", choices=ENCODERS, default="fast",
                        help="tokenizer call of (a) and (c): fast = encode_batch_fast (default; what ringload's "
                             "producers call), batch = encode_batch")
    parser.add_argument("--corpus", action="append", metavar="KIND[,KIND...]",
                        help=f"document sizes: {', '.join(CORPORA)} (default kjv); each gets its own bound")
    parser.add_argument("--slots", action="append", default=[], metavar="N[,N...]",
                        help="also run ringload with N slots per producer (default: ringload's own)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="bert",
                        help="bert = bert-wordpiece (default), gpt2 = gpt2-bpe (byte-level BPE)")
    parser.add_argument("--task", choices=TASKS, default="mlm",
                        help="mlm (default) or clm; (c) and (d) do mlm only")
    parser.add_argument("--engine", action="append", metavar="NAME[,NAME...]",
                        help=f"run ringload with each tokenizer_engine: {', '.join(ENGINES)} (default auto)")
    parser.add_argument("--cache-epochs", type=int, metavar="N",
                        help="instead: the token-cache benchmark, ringload with epochs: N uncached, cached, rerun")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all numbers here")
    args = parser.parse_args(argv)
    args.engine = list(dict.fromkeys(e for item in args.engine or ["auto"] for e in item.split(",") if e))
    if unknown := set(args.engine) - set(ENGINES):
        parser.error(f"unknown engine(s) {', '.join(sorted(unknown))}; pick from {', '.join(ENGINES)}")
    args.producers = list(dict.fromkeys(_int_list(args.producers or ["2"])))
    args.skip = {s for item in args.skip for s in item.split(",") if s}
    args.corpus = list(dict.fromkeys(c for item in args.corpus or ["kjv"] for c in item.split(",") if c))
    if unknown := set(args.corpus) - set(CORPORA):
        parser.error(f"unknown corpus kind(s) {', '.join(sorted(unknown))}; pick from {', '.join(CORPORA)}")
    args.slots = [None, *_int_list(args.slots)]
    if unknown := args.skip - set(CONTENDERS):
        parser.error(f"unknown contender(s) {', '.join(sorted(unknown))}")
    if args.task != "mlm" and not {"handmade", "hf"} <= args.skip:
        parser.error("the baselines (c) and (d) do mlm only: add --skip hf,handmade")
    if min(args.producers) < 1:
        parser.error("--producers must be at least 1")
    return args


def plan(producers: list[int], skip: set[str], corpora: list[str], slots: list[int | None],
         engines: list[str]) -> list[tuple[str, int, str, int | None, str]]:
    """(contender, P, corpus, slots, engine) in run order: per corpus, the bound then ringload (with
    each engine) at each P."""
    runs = [(c, p, kind, None, engine) for kind in corpora for p in producers
            for c, engine in [("tokenizer", "auto"), *(("ringload", e) for e in engines)]]
    runs += [("ringload", p, kind, n, engines[0]) for kind in corpora for p in producers for n in slots if n]
    runs += [(c, producers[0], corpora[0], None, "auto") for c in ("handmade", "hf")]
    return [run for run in runs if run[0] not in skip]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    headline = args.producers[0]
    before = cpu_counters()
    time.sleep(1.0)
    busy = foreign_share(before, cpu_counters())
    if busy > 0.1:
        print(f"warning: other work keeps the CPUs {busy:.0%} busy; it will lower and scatter "
              f"the numbers (column 'other': its share during each measurement)",
              file=sys.stderr)
    results: list[Result] = []
    corpora: dict[str, Corpus] = {}
    with tempfile.TemporaryDirectory(prefix="ringload-bench-") as tmp:
        tokenizer_path = bench_tokenizer(args.tokenizer, Path(tmp))
        tokenizer = load_tokenizer(tokenizer_path)
        for kind in args.corpus:
            shards = 0 if "hf" in args.skip or kind != args.corpus[0] else headline
            corpus = corpora[kind] = build_corpus(Path(tmp), args.mb, tokenizer, shards, kind)
            print(f"corpus {kind}: {corpus.nbytes / 1e6:.1f} MB, {corpus.docs:,} documents of KJV verses, "
                  f"{corpus.tokens:,} tokens")
        task = f"MLM {MASK_PROB:.0%}" if args.task == "mlm" else "CLM"
        print(f"batch {BATCH_SIZE}x{SEQ_LEN}, {task}, tokenizer {args.tokenizer}; "
              f"(a), (c) use {ENCODERS[args.encode]}; "
              f"{os.cpu_count()} CPUs; TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}\n")
        if args.cache_epochs:
            print(f"token cache, P = {headline}, tokens/s of epochs 1..{args.cache_epochs} (x epoch 1 of the same run)")
            report = cache_epochs(corpora[args.corpus[0]], tokenizer_path, headline, args.cache_epochs, args.task)
            if args.json:
                args.json.write_text(json.dumps({"cache_epochs": report, "mb": args.mb,
                                                 "packages": package_versions()}, indent=2) + "\n")
            return 0
        print(HEADER, flush=True)
        bounds: dict[tuple[str, int], float] = {}
        for contender, producers, kind, slots, engine in plan(args.producers, args.skip, args.corpus, args.slots,
                                                             args.engine):
            job = Job(contender, producers, corpora[kind], tokenizer_path, ENCODERS[args.encode],
                      args.seconds, slots, args.task, engine)
            before = cpu_counters()
            result = tokenizer_bound(job) if contender == "tokenizer" else run_isolated(job)
            result.corpus, result.slots = kind, slots
            result.foreign_cpu = foreign_share(before, cpu_counters())
            if contender == "tokenizer" and result.tokens_per_s:
                bounds[kind, producers] = result.tokens_per_s
            if result.tokens_per_s and (kind, producers) in bounds:
                result.vs_bound = result.tokens_per_s / bounds[kind, producers]
            results.append(result)
            print_row(result)

    ratios = {p: ringload_ratios(results, p) for p in args.producers}
    print()
    for producers, against in ratios.items():
        shown = ", ".join(f"{CONTENDERS[c]} {v:.2f}x" for c, v in against.items() if v)
        print(f"ringload / others at P={producers}: {shown or 'n/a'}")
    if args.json:
        report = {
            "config": {"producers": args.producers, "mb": args.mb, "seconds": args.seconds,
                       "corpora": args.corpus, "slots": [n for n in args.slots if n],
                       "encode": ENCODERS[args.encode], "tokenizer": args.tokenizer, "task": args.task,
                       "engines": args.engine,
                       "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN, "mask_prob": MASK_PROB,
                       "warmup_s": WARMUP_S, "corpus_share_timed": CORPUS_SHARE,
                       "burst_rounds": BURST_ROUNDS,
                       "settle_s": SETTLE_S, "skip": sorted(args.skip)},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(),
                            "foreign_cpu_before": busy,
                            "TOKENIZERS_PARALLELISM": os.environ["TOKENIZERS_PARALLELISM"],
                            "packages": package_versions()},
            "corpora": {kind: {"bytes": c.nbytes, "docs": c.docs, "tokens": c.tokens} for kind, c in corpora.items()},
            "results": [asdict(r) for r in results],
            "ringload_ratio": {str(p): v for p, v in ratios.items()},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
