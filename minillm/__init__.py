"""minillm: a small GPT whose every forward and backward pass is written by hand in NumPy (or CuPy)."""

__version__ = "0.1.0"
