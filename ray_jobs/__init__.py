"""Thin Ray programs: each parses `--config YAML` plus `key=value` overrides and calls the library.

    python -m ray_jobs.shards   --config ray_jobs/configs/tiny.yaml
    python -m ray_jobs.pretrain --config ray_jobs/configs/tiny.yaml --out runs/pretrain

Each also runs as a `ray job submit --working-dir . -- python -m ray_jobs.<name> ...` entrypoint.
"""
