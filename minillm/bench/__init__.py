"""Benchmarks: each module times one part of minillm and prints a table.

    python -m minillm.bench.<name> [--write]

`--write` also records the table, with the date, machine and command, as a
section of BENCHMARKS.md (replacing that section's previous run).
"""
