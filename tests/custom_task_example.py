"""A custom task, as a recipe names it (``type: custom_task_example:WordCount``): used by the tests
and shown in the README. It predicts how many words each text has, from its first tokens."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

import ringload


class WordCount(ringload.Task):
    options = {"seq_len": 32, "special_tokens": {}}

    def fields(self) -> list[ringload.Field]:
        b, n = self.batch_size, self.opts["seq_len"]
        return [ringload.Field("input_ids", np.dtype("<i4"), (b, n)),
                ringload.Field("labels", np.dtype("<f4"), (b,))]

    def batches(self, records, chunk: int) -> Iterator[ringload.PendingBatch]:
        n, texts = self.opts["seq_len"], records.texts
        for start in range(0, len(texts) - len(texts) % self.batch_size, self.batch_size):
            group = texts[start:start + self.batch_size]
            ids = self.tok.encode_ids(group)

            def write(out, ids=ids, group=group):
                out["input_ids"].fill(0)
                for row, tokens in enumerate(ids):
                    out["input_ids"][row, :min(n, len(tokens))] = tokens[:n]
                out["labels"][:] = [len(t.split()) for t in group]

            yield ringload.PendingBatch(write, rows=len(group), tokens=sum(min(n, len(t)) for t in ids),
                                        records_done=start + len(group))
