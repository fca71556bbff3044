"""Shared infrastructure: settings, database and schema, outboxes, events, outbound HTTP, logs."""
