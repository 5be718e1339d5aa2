"""jaxserve/runtime."""
