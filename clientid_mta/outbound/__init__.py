"""Outbound mail: the durable queue, its runner, bounces, DKIM signing and MX routing."""
