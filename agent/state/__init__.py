"""What the agent keeps on disk between runs (SQLite in its state directory)."""
