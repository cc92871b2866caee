"""The decision log: hash-chained JSON-lines files written off the scoring path, and their verification."""
