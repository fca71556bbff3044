#!/bin/sh
# Start a `passerelle` command with an empty metrics folder: prometheus-client's
# multiprocess files from a previous run would be added to this one's.
set -eu
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi
exec passerelle "$@"
