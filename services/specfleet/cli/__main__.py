"""`python -m specfleet.cli ...` (how `up` starts its services) is `specfleet ...`."""

from specfleet.cli.main import main

raise SystemExit(main())
