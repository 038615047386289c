"""Pure metric functions on arrays: similarity, probes, rare events, statistics."""
