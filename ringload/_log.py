"""The ring's log: what the daemon and its producers write, in one format, to stderr.

Stderr is the ring's log file (``_housekeeping.log_file``) when the daemon was started detached or from
Python, and the terminal for a foreground ``ringload start``; spawned producers inherit it.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s ringload: %(message)s"


def log_to_stderr() -> None:
    """Send this process's log records (``ringload.*`` loggers, INFO and above) to stderr in the ring log's format."""
    logging.basicConfig(level=logging.INFO, format=FORMAT, stream=sys.stderr)
