"""Runtime: buckets, KV cache arrays, the model runner. This package's __init__ imports no jax."""
