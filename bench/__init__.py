"""Benchmarks: one module per question, run from the repository root as `python -m bench.NAME --help`.

Each module's docstring says the question it answers, the command that answers it and where it
writes; what they share (repository paths, the record every result carries, tables, timing, a
`vqtok serve` subprocess, the HTTP load generator, tiny models and photo folders) is in
`bench.harness`, and no module imports another's helpers. Committed results live under
`bench/results/QUESTION/MACHINE-DATE[-WHAT]/`; BENCHMARKS.md has the current figures."""
