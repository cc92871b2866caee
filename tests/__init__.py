"""Test suite. Imported before conftest and before anything loads LightGBM's OpenMP runtime."""

import os

# Idle OpenMP threads spin by default; on a shared 2-core machine, training the demo models while servers
# and monitors run in other processes then takes 5-8x longer. Children (servers, monitors) inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
