"""`python -m specfleet ...` is `specfleet ...`."""

from specfleet.cli.main import main

raise SystemExit(main())
