"""Retention: policies, prune, consolidation, status of backup sets."""
