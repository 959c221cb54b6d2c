"""Instant access: read a disk at a backup point without restoring it (map, mount)."""
