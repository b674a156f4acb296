"""Feature stores: the in-memory one (embedded default) and Redis (production)."""
