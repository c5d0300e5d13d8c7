"""Speed benchmarks: printed tables, never timed assertions."""
