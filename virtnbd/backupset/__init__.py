"""One folder per chain: file names, the chain manifest, chain resolution (spec: docs/FORMAT.md)."""
