"""``python -m dynroute``: the command line of :mod:`dynroute.cli`."""

from dynroute.cli import main

raise SystemExit(main())
