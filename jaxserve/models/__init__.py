"""Flax NNX model families and their registry."""

from jaxserve.models.registry import MODEL_REGISTRY, UnsupportedArchitectureError, model_class_for

__all__ = ["MODEL_REGISTRY", "UnsupportedArchitectureError", "model_class_for"]
