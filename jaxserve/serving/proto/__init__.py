"""jaxserve.v1 gRPC API: the .proto and its committed generated Python stubs."""
