"""`python -m imagegen`: the command line (imagegen.cli)."""

from imagegen.cli import main

raise SystemExit(main())
