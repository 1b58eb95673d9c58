"""Operating sllmfs: systemd integration, health checks."""
