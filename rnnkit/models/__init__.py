"""rnnkit.models (filled in by its owner)."""
