"""Demo assets: short speech recordings generated with espeak-ng (see docs/operations.md)."""
