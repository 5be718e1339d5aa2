"""Checkpoint reading: safetensors, the HF-name mapping, and model loading."""
