"""Watching the server run: the events the other layers report, the Prometheus metrics
and health checks served over HTTP, and the JSON log format."""
