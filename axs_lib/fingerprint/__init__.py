"""Environment and data fingerprints."""
