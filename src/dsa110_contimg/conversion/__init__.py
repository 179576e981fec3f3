"""conversion package."""
