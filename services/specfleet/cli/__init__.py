"""The `specfleet` command: `main.py` assembles one module per command group (each declares its arguments next to
its handler); `options.py` holds what several share. Nothing in the package imports `cli`."""
