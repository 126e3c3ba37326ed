"""cuda backend (placeholder, filled in by the accelerator-backends work)."""
