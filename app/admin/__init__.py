"""Administration: dashboard queries, admin users, API keys, the audit log."""
