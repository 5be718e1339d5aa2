"""HF checkpoint -> jaxserve checkpoint conversion (`jaxserve convert`)."""

from converters.hf_to_jaxserve import convert

__all__ = ["convert"]
