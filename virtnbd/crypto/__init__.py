"""Encryption at rest: key sources, key slots, AEAD sealing of frames and side files (docs/FORMAT.md)."""
