"""Running the system: readiness, Prometheus metrics, retention."""
