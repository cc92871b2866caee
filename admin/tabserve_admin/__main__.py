"""`python -m tabserve_admin` runs `tabserve-admin`."""

from tabserve_admin.cli import main

raise SystemExit(main())
