"""Runtime: Engine (load + call + generate) and one runner per backend."""
