"""Servers: the async engine behind a gRPC service and an OpenAI-compatible HTTP API."""
