"""jaxserve/serving."""
