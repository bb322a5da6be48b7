"""``python -m keeplink.cli_client devices ...``: the client commands on their own."""

from keeplink.cli_client._run import main

raise SystemExit(main())
