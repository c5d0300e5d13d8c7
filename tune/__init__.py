"""Kept only so `python -m tune.sweep` still runs: the program is `python -m ray_jobs.sweep`."""
