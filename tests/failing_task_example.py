"""A custom task that builds in the daemon but not in a producer process, as a task whose resource
is missing where producers run would: tests/test_errors.py uses it to see how a producer that
fails before its first chunk is reported (``type: failing_task_example:FailsInProducers``)."""

from __future__ import annotations

import multiprocessing

from custom_task_example import WordCount


class FailsInProducers(WordCount):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if multiprocessing.current_process().name.startswith("ringload-producer"):
            raise RuntimeError("the vocabulary cache is missing on this machine")
