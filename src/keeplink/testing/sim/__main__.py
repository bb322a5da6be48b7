"""``python -m keeplink.testing.sim``: run one simulated device (see ``--help``)."""

from keeplink.testing.sim._cli import main

raise SystemExit(main())
