"""jaxserve/engine."""
