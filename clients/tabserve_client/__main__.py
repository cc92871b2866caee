"""`python -m tabserve_client`: the same as the `tabserve-client` command."""

import sys

from tabserve_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
