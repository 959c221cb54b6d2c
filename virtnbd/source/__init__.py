"""Where a backup's disk data comes from: which ranges to read (extents, RBD diffs) and the NBD reader."""
