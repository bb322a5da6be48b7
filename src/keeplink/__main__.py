"""``python -m keeplink`` is the ``keeplink`` command."""

from keeplink.cli import main

raise SystemExit(main())
