"""`toroidal bench`: sweeps of attention calls timed against plain SDPA, ring and streaming rows,
the backend tuner and the stage profiler."""
