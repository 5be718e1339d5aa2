"""jaxserve/layers."""
