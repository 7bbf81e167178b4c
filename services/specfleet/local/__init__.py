"""The fleet on one machine: `specfleet up` (each role a local process, `up.py`), its autoscaler (`autoscale.py`),
the demo (`demo.py`), and every role in one process for tests and benchmarks (`inprocess.py`). Imports the services
and `runtime/`; only `cli/`, `bench/` and tests import it."""
