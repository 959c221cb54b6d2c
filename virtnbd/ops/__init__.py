"""Operations around the backup engine: many domains per run, hooks, metrics."""
