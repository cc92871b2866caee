"""Code the server and the monitor share: settings loading and checking, address parsing, MLflow client setup.

Installed with the server distribution; the client distribution (`clients/`) does not need it.
"""
