"""``python -m gradwatch``: the same as the ``gradwatch`` command."""

from gradwatch.cli import main

raise SystemExit(main())
