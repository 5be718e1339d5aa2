"""End-to-end tests of the LLM API on tiny random-weight HF checkpoints."""
