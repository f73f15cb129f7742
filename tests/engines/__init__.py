"""Engines the tests drive, each also a command for long runs from the repository root.

``python -m tests.engines.faults`` (many trials of real SIGKILLs; ``tests/test_faults.py`` runs a few)
and ``python -m tests.engines.soak`` (a million checksummed batches through a small ring, leaks watched).
"""
