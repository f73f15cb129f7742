"""The ``ringload`` command: start and stop rings, and look at what they are doing.

Every error, whether ringload's own or a usage mistake click finds, is one line ``ringload: ...``
on stderr and exit code 2 (``run``)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from ._errors import RingError, RingloadError
from ._names import validate_name
from ._types import MAX_LANES, MAX_RANKS


@click.group()
def main() -> None:
    """ringload: tokenized batches from raw text, through shared memory, into your training loop."""


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Ring name (default: the recipe's name).")
@click.option("--producers", type=click.IntRange(1, MAX_LANES), help="Producer processes (default: the recipe's).")
@click.option("--world-size", type=click.IntRange(1, MAX_RANKS),
              help="Consumer ranks on this node, one per training process (torchrun's --nproc-per-node).")
@click.option("--nnodes", type=click.IntRange(1), help="Nodes, each running its own `ringload start` of this recipe.")
@click.option("--node-rank", type=click.IntRange(0), help="This node's rank, 0..nnodes-1.")
@click.option("--detach", is_flag=True, help="Run the daemon in the background and return once the ring is ready.")
@click.option("--resume", type=click.Path(exists=True, dir_okay=False),
              help="A JSON state from loader.state_dict(): continue right after its last batch.")
@click.option("--stop-with", type=int, hidden=True, help="Stop when this process ends (set by ringload.start()).")
def start(recipe: str, name: str | None, producers: int | None, world_size: int | None, nnodes: int | None,
          node_rank: int | None, detach: bool, resume: str | None, stop_with: int | None) -> None:
    """Create a ring from RECIPE and serve it until stopped."""
    from ._daemon import Daemon
    from ._handle import launch
    from ._housekeeping import log_file
    from ._log import log_to_stderr
    from ._recipe import load_recipe

    loaded = load_recipe(recipe)
    sharding = {"world_size": world_size, "nnodes": nnodes, "node_rank": node_rank}
    loaded = loaded.replace(producers=producers, **sharding)
    ring_name = validate_name(name if name is not None else loaded.name)
    state = json.loads(Path(resume).read_text()) if resume else None
    if detach:
        process = launch(recipe, ring_name, producers, detach=True, resume_path=resume, sharding=sharding)
        click.echo(f"ring {ring_name} ready (daemon pid {process.pid}, log {log_file(ring_name)}); "
                   f"`ringload stop {ring_name}` ends it")
        return
    log_to_stderr()
    sys.exit(Daemon(loaded, ring_name, resume=state, stop_with=stop_with).run())


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--world-size", type=click.IntRange(1, MAX_RANKS),
              help="Consumer ranks per node, as `ringload start` will get.")
@click.option("--nnodes", type=click.IntRange(1), help="Nodes, as `ringload start` will get.")
@click.option("--processes", type=click.IntRange(1, MAX_LANES),
              help="Tokenizing processes (default: the recipe's producers).")
def plan(recipe: str, world_size: int | None, nnodes: int | None, processes: int | None) -> None:
    """Count the batches each rank gets per epoch of RECIPE (tokenizing it once), for len() of its loaders.

    The counts are stored in the user's cache, keyed by the stream and its files' sizes and times;
    `ringload start` of the same recipe, ranks and files picks them up."""
    from ._plan import make_plan
    from ._recipe import load_recipe

    loaded = load_recipe(recipe).replace(world_size=world_size, nnodes=nnodes)
    counts, path = make_plan(loaded, processes)
    ranks = loaded.world_size * loaded.nnodes
    for epoch, batches in enumerate(counts):
        click.echo(f"epoch {epoch}: {batches} batches per rank ({ranks} rank{'s' if ranks > 1 else ''})")
    click.echo(f"plan stored in {path}")


@main.command()
@click.argument("name")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait before killing the daemon.")
def stop(name: str, timeout: float) -> None:
    """Stop the ring NAME: its daemon stops the producers and removes every shared object."""
    from ._failures import forget_failure, read_failure
    from ._housekeeping import remove_ring, ring_owner
    from ._names import list_ring_names, pid_alive

    validate_name(name)
    pid = ring_owner(name)
    if pid is None:
        if name in list_ring_names():
            remove_ring(name)
            click.echo(f"ring {name}: its daemon was already dead; removed what it left behind")
            return
        failure = read_failure(name)
        if failure is not None:
            forget_failure(name)
            click.echo(f"ring {name}: had already failed and been removed ({failure['error']}); forgot that failure")
            return
        raise RingError(f"no ring named {name!r} (see `ringload ls`)")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        remove_ring(name)
        click.echo(f"ring {name}: daemon pid {pid} did not stop within {timeout:.0f} s; killed it and removed the ring")
    else:
        click.echo(f"ring {name}: stopped")


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted (redrawn in place on a terminal).")
def status(name: str | None, as_json: bool, watch: bool) -> None:
    """State, position, fill and producer counters of ring NAME (default: the only ring)."""
    from ._names import list_ring_names
    from ._status import list_rings, ring_status

    if name is None:
        rings = [r["name"] for r in list_rings()]
        if len(rings) != 1:
            raise RingError(f"name a ring: there are {len(rings)} ({', '.join(rings) or 'none'})")
        name = rings[0]
    snapshot = ring_status(name)
    terminal = watch and sys.stdout.isatty()
    frames = 0
    try:
        while True:
            frame = json.dumps(snapshot, indent=2) if as_json else _render_status(snapshot)
            if terminal:
                # Redraw in place: cursor home, each line overwritten and cleared to its end, then the rest of
                # the screen cleared. Only the first frame clears the whole screen (clearing every time would
                # flicker and push each frame into the terminal's scrollback).
                lines = "".join(f"{line}\x1b[K\n" for line in frame.split("\n"))
                click.echo(("\x1b[H\x1b[2J" if frames == 0 else "\x1b[H") + lines + "\x1b[J", nl=False)
            else:
                click.echo(("\n" if frames else "") + frame)
            frames += 1
            if not watch or snapshot["removed"]:
                return
            time.sleep(1.0)
            try:
                snapshot = ring_status(name, previous=snapshot)  # shares of the last interval
            except RingError:
                if name in list_ring_names():
                    raise
                click.echo(f"ring {name} was stopped and removed")
                return
    except KeyboardInterrupt:
        return  # the way to end --watch


def _render_engine(choice: dict) -> str:
    return f"token ids encoded by {choice['engine']} ({choice['reason']})"


def _render_status(s: dict) -> str:
    if s["removed"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["failed_at"] or 0))
        return "\n".join([
            f"ring {s['name']}  state failed, removed  daemon pid {s['daemon_pid']} (ended)",
            f"failed at {when}" + (f"; log {s['log']}" if s["log"] else ""),
            f"ERROR: {s['error']}",
            f"`ringload start RECIPE --name {s['name']}` starts it again; `ringload stop {s['name']}` forgets this",
        ])
    g = s["geometry"]
    lines = [
        f"ring {s['name']}  state {s['state']}  daemon pid {s['daemon_pid']} "
        f"({'alive' if s['daemon_alive'] else 'DEAD'}, "
        f"heartbeat {s['heartbeat_age_s']:.1f} s ago)",
        f"batches {g['batch_size']} x {', '.join(f['name'] + str(f['shape'][1:]) for f in g['fields'])}  "
        f"{g['producers']} producers x {s['sharding']['ranks']} ranks x {g['slots_per_lane']} slots  "
        f"{g['bytes'] / 2**20:.1f} MiB" + (f"  node {s['sharding']['node_rank']} of {s['sharding']['nnodes']}"
                                           if s["sharding"]["nnodes"] > 1 else ""),
        f"fill {s['fill']['slots_filled']}/{s['fill']['slots_total']} slots  "
        f"{s['rates']['batches_per_s']:.1f} batches/s  {s['rates']['tokens_per_s'] / 1e6:.3f} Mtokens/s",
        f"sources: {s['source_bytes']['fetched'] / 2**20:.1f} MiB fetched of "
        f"{s['source_bytes']['listed'] / 2**20:.1f} MiB in the files opened so far"
        + (f", {s['source_bytes']['from_cache'] / 2**20:.1f} MiB served from the token cache"
           if s["source_bytes"]["from_cache"] else "")
        + (f"  (stream ends at chunk {s['end_chunk']})" if s["end_chunk"] is not None else ""),
    ]
    if s["tokenizer_engine"]:
        lines.append(_render_engine(s["tokenizer_engine"]))
    lines += [f"rank {c['rank']}: consumer {c['pid'] or '-'}  next chunk {c['chunk']} batch {c['index']}  "
              f"delivered {c['delivered']}" for c in s["consumers"]]
    shares = [template.format(s["packing"][key]) for key, template in
              (("padding_ratio", "padding {:.2%} of row tokens"),
               ("trimmed_padding_ratio", "{:.2%} once trimmed to the longest row"),
               ("truncation_ratio", "{:.2%} of documents cut across rows"))
              if s["packing"][key] is not None]
    if shares:
        lines.append("  ".join(shares))
    if s["error"]:
        lines.append(f"ERROR: {s['error']}")
    if s["source_errors"]:
        lines.append(f"files skipped from a broken point on: {s['source_errors']} (see the daemon's log)")
    lines += _render_stages(s["stages"])
    header = ("lane", "pid", "alive", "batches", "examples", "tokens", "restarts", "bad", "truncated",
              "dropped tok/ex", "unknown labels", "chunk", "chunk KiB/age", "work/wait chunk/wait slot s")
    rows = [header] + [
        (p["lane"], p["pid"], "yes" if p["alive"] else "no", p["batches"], p["examples"], p["tokens"], p["restarts"],
         p["bad_records"], p["records_truncated"], f"{p['tokens_dropped']}/{p['examples_dropped']}",
         p["labels_unknown"], p["current_chunk"], f"{p['chunk_bytes'] // 1024}/{p['chunk_age_s'] or 0:.1f}s",
         f"{p['work_s']:.1f}/{p['wait_chunk_s']:.1f}/{p['wait_slot_s']:.1f}")
        for p in s["producers"]
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _render_stages(stages: dict) -> list[str]:
    """Where time goes, as percentages, and the stage holding the others up."""
    def pct(share: float | None) -> str:
        return "-" if share is None else f"{100 * share:.0f}%"

    p, r = stages["producers"], stages["reader"]
    waits = ", ".join(f"rank {rank} {pct(w)}" for rank, w in enumerate(stages["consumers_wait"]) if w is not None)
    lines = [f"time: producers work {pct(p['work'])}, wait for a chunk {pct(p['wait_chunk'])}, wait for a slot "
             f"{pct(p['wait_slot'])}; reader reads {pct(r['read'])}, waits {pct(r['wait'])}; consumers wait for the "
             f"due batch: {waits or 'none connected'}"]
    if stages["bottleneck"]:
        lines.append(f"bottleneck: {stages['bottleneck']}")
    return lines


@main.command()
@click.argument("name")
@click.option("--batch", "k", default=0, show_default=True, help="Which unread batch: 0 is the consumer's next.")
@click.option("--rows", default=2, show_default=True, help="How many rows of the batch to show.")
@click.option("--rank", default=0, show_default=True, help="Whose batches: a local rank of the ring.")
def inspect(name: str, k: int, rows: int, rank: int) -> None:
    """Decode a batch waiting in ring NAME back to text, as the model will see it.

    Masked-LM positions show as [input->label], causal-LM rows mark document boundaries,
    classification rows show their labels by name.
    """
    from ._status import peek
    from ._tasks import build_task

    found = peek(name, k, rank=rank)
    recipe = found["recipe"]["recipe"]
    task = build_task(recipe["task"], recipe["tokenizer"], recipe["batch_size"], recipe["seed"])
    click.echo(f"ring {name}: chunk {found['chunk']} batch {found['index']} (lane {found['lane']}), "
               f"task {recipe['task']['type']}")
    if found["recipe"].get("tokenizer_engine"):
        click.echo(_render_engine(found["recipe"]["tokenizer_engine"]))
    for row in range(min(rows, recipe["batch_size"])):
        click.echo(f"--- row {row}")
        click.echo(task.describe_row({key: array[row] for key, array in found["arrays"].items()}))


@main.command(name="ls")
def list_command() -> None:
    """The rings on this machine and whether their daemon is alive."""
    from ._status import list_rings

    rings = list_rings()
    if not rings:
        click.echo("no rings")
        return
    for r in rings:
        if r.get("removed"):
            alive = f"ended; ring removed (`ringload status {r['name']}` says why)"
        else:
            alive = "alive" if r["alive"] else "dead (`ringload clean` removes it)"
        click.echo(f"{r['name']}\t{r['state']}\tdaemon {r['daemon_pid']} {alive}")


@main.command()
def clean() -> None:
    """Remove every ring (and stray semaphore) whose daemon is dead, and the records of failed rings."""
    from ._failures import failed_names, forget_failure
    from ._housekeeping import clean_orphans

    removed = clean_orphans()
    forgotten = [name for name in failed_names() if forget_failure(name)]
    click.echo(f"removed {len(removed)} orphaned ring(s)" + (f": {', '.join(removed)}" if removed else "")
               + (f"; forgot the failures of {', '.join(forgotten)}" if forgotten else ""))


@main.group()
def cache() -> None:
    """The token cache (recipe key token_cache): what it holds, and freeing it."""


def _cache_dir_option(command: Any) -> Any:
    from ._cache import default_cache_dir

    return click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                        default=default_cache_dir(), show_default=True,
                        help="The cache directory (a recipe's token_cache.dir, if it names one).")(command)


@cache.command(name="ls")
@_cache_dir_option
def cache_ls(directory: Path) -> None:
    """Show what the token cache in --dir holds: entries, their size, and the laps it can serve unread."""
    from ._cache import FORMAT, directory_usage, lap_maps

    total, counts = directory_usage(directory / FORMAT)
    click.echo(f"{directory}: {counts['entries']} chunk entries, {counts['lap_maps']} lap maps, "
               f"{total / 2**20:.1f} MiB" + (f"; {counts['temporary']} temporary files of writers that are running "
                                             "or were killed" if counts["temporary"] else ""))
    for lap in lap_maps(directory):
        click.echo(f"  lap of {lap['files']}: {lap['chunks']} chunks, {lap['bytes'] / 2**20:.1f} MiB of text"
                   + (f" (shuffled, epoch {lap['epoch']}, lap {lap['lap']})" if lap["epoch"] is not None else ""))


@cache.command(name="clear")
@_cache_dir_option
def cache_clear(directory: Path) -> None:
    """Remove everything the token cache in --dir holds (running rings then tokenize again)."""
    from ._cache import clear

    files, size = clear(directory)
    click.echo(f"removed {files} files, {size / 2**20:.1f} MiB, from {directory}")


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def run() -> None:
    """Console-script entry point: every error is one line `ringload: ...` on stderr, exit code 2."""
    try:
        code = main(standalone_mode=False)
    except RingloadError as exc:
        _fail(str(exc))
    except _NO_ARGS_IS_HELP as exc:
        click.echo(exc.format_message())  # `ringload` alone: the help, not an error
        code = 0
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        _fail(exc.format_message() + hint)
    except click.ClickException as exc:
        _fail(exc.format_message())
    except click.Abort:
        code = 130  # interrupted (Ctrl-C) outside a command that handles it
    sys.exit(code or 0)


def _fail(message: str) -> NoReturn:
    click.echo(f"ringload: {message}", err=True)
    sys.exit(2)
