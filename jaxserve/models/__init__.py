"""jaxserve/models."""
