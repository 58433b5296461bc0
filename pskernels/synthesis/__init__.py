"""Parallel-Synthesis pipeline around the kernels: real models (``models``), and later the cache mapper,
synthesizer adapter and training recipe."""
