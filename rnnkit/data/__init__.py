"""rnnkit.data (filled in by its owner)."""
