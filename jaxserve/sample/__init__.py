"""jaxserve/sample."""
