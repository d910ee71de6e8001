"""Wiring: the service that owns every part, twistd glue and worker processes."""
