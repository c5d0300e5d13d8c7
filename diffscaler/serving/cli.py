"""`diffscaler serve`: put every adapter of a folder behind one Ray Serve endpoint.

    diffscaler serve --backbone runs/demo/backbone/backbone.safetensors --adapters runs/demo/adapters \\
        [--config serve.yaml] [serve.port=8000 serve.max_batch_size=32 ...]

Checks the backbone, the adapters and the port before Ray; joins pipeline.ray_address (a local cluster when
empty), starts Serve's HTTP proxy on serve.host:serve.port, deploys `diffscaler.serving.app` and serves until
Ctrl-C or SIGTERM, then deletes the application (and stops the local Ray it started).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading

APP_NAME = "diffscaler"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve every adapter of a folder on Ray Serve (HTTP, mixed-task batches)")
    p.add_argument("--backbone", required=True, help="backbone.safetensors")
    p.add_argument("--adapters", required=True, help="folder of <task>.safetensors adapters (a fine-tune's --out)")
    p.add_argument("--config", default=None, help="experiment YAML with a serve: section (default: built-in)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. serve.port=8000 serve.max_batch_size=64")
    p.set_defaults(func=cmd_serve)


def check_inputs(backbone: str, adapters: str, cfg) -> list[str]:
    """The servable task names; ValueError naming the problem (backbone, adapters, port), before Ray."""
    from diffscaler.artifacts import read_backbone_meta
    from diffscaler.config import ModelConfig, from_dict
    from diffscaler.serving.runtime import AdapterCatalog, refuse_unet

    meta = read_backbone_meta(backbone)
    model = from_dict(ModelConfig, meta["model"], "backbone.model")
    refuse_unet(model, backbone)
    if model.in_channels != 3:
        raise ValueError(
            f"--backbone {backbone}: a latent backbone ({model.in_channels} channels); serve takes "
            "pixel-space backbones"
        )
    catalog = AdapterCatalog(adapters, meta["content_hash"], model, log=lambda _m: None)
    catalog.scan()
    if not catalog.entries:
        why = "; ".join(f"{f}: {r}" for f, r in catalog.refused.items()) or "no <task>.safetensors files"
        raise ValueError(f"--adapters {adapters}: no adapter fits the backbone ({why})")
    for file, reason in catalog.refused.items():
        print(f"serve: refused {file}: {reason}", file=sys.stderr)
    s = cfg.serve
    with socket.socket() as sock:
        try:
            sock.bind((s.host, s.port))
        except OSError as err:
            raise ValueError(
                f"serve.port {s.port}: cannot listen on {s.host}:{s.port} ({err.strerror}); choose another port"
            ) from None
    return sorted(catalog.entries)


def cmd_serve(args: argparse.Namespace) -> int:
    from diffscaler.config import load_config

    cfg = load_config(args.config, args.overrides)
    tasks = check_inputs(args.backbone, args.adapters, cfg)

    import ray
    from ray import serve

    from diffscaler.cluster import connect_ray
    from diffscaler.serving.app import build_app

    started = connect_ray(cfg)  # "local" (a new cluster) unless pipeline.ray_address / RAY_ADDRESS
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    s = cfg.serve
    try:
        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(build_app(args.backbone, args.adapters, cfg), name=APP_NAME, route_prefix=s.route_prefix)
        url = f"http://{s.host}:{s.port}{s.route_prefix.rstrip('/')}"
        print(json.dumps({"serving": url, "tasks": tasks, "generate": f"{url}/v1/generate"}), flush=True)
        stop.wait()
        print("serve: stopping", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
    return 0
