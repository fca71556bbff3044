"""``python -m app.cli`` (tests, benchmarks and the cluster harness start processes so)."""

from app.cli import main

main()
