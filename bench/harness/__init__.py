"""What the benchmarks share, so that none imports another's helpers.

- `bench.harness.record`: the repository's paths, the record every result file carries (date, host,
  CPUs, Python, git revision, command line), JSON writing, markdown tables, small argument parsers.
- `bench.harness.timing`: timing a callable, a runtime's encode back to back, decoded batches.
- `bench.harness.procs`: CPU seconds and memory of a process tree, of threads and of the host (/proc).
- `bench.harness.server`: a `vqtok serve` subprocess on a free localhost port, waited for and stopped;
  its /metrics counters.
- `bench.harness.load`: the HTTP load generator (pre-built multipart requests on raw keep-alive
  sockets, in processes that measure over one window) and the JPEGs it sends.
- `bench.harness.fixtures`: tiny exported models, untrained presets, folders of photos.
"""
