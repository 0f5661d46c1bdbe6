"""Worker processes on this host: runtime records, ports, spawn, readiness and stop."""
