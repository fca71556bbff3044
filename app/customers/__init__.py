"""Customers: the one write path (validation, email ownership, consents) and the CSV/NDJSON importers."""
