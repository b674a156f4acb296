"""Feature schema files shipped with the package (see gateway.schema)."""
