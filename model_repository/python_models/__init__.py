"""Sources of the generated python-backend models (copied into each repository)."""
