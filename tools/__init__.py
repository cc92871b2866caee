"""Developer tooling: code generation, Debian tool installation, measurement scripts."""
