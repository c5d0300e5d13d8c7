"""DiT against the U-Net baseline (issue 24, the paper's third claim), per task: one table from the fid.json
of a DiT run (`make compare`, or `make compare-matched`, whose full, DiffFit and BitFit rows have compare.yaml's
budgets) and of `make compare-unet` (diffusers' UNet2DModel, same pretraining set, image budget and fine-tune
budget).

    python -m bench.compare_arch runs/compare/fid.json runs/compare-unet/fid.json

For each task and method both architectures ran (full, difffit, bitfit; `scratch` too when both have it):
FID and KID, mean ± std over the training seeds each run has; the gain over that architecture's own
no-adapter row (what fine-tuning bought; higher is better); and the verdict on FID, DiT against U-Net
(diffscaler.seed_spread: a win only beyond the seed spread). Where one side has a single seed and the other
several, the verdict is marked `(est.)`: it assumes the single-seed side spreads as the other does, so a win
needs a gap beyond twice the other side's std. FID and KID use each run's feature network, printed: the two runs
are comparable only with the same network and sample counts. A run folder's config.json names its backbone's
arch; a DiT file that is a U-Net run (or the reverse) is refused by name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from diffscaler.seed_spread import SeedStats, pool_seeds, verdict

METHODS = ("full", "difffit", "bitfit", "scratch")
NO_ADAPTER = "no adapter"


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_text())["results"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a readable fid.json ({err})") from None


def check_arch(path: Path, expected: str) -> None:
    """Refuse a fid.json whose run folder's config.json records another `model.arch` (a run without a
    config.json beside it is taken as given)."""
    config = path.parent / "config.json"
    if not config.is_file():
        return
    try:
        arch = json.loads(config.read_text())["model"].get("arch", "dit")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise SystemExit(f"{config}: not a readable run config ({err})") from None
    if arch != expected:
        raise SystemExit(f"{path}: a model.arch={arch} run (its {config.name}), given where the {expected} run goes")


def judge(a: SeedStats, b: SeedStats) -> str:
    """verdict() when both sides have seeds; with one seed on one side only, the same rule with that side's
    std taken as the other's (marked `(est.)`); `?` when neither has a spread."""
    if a.n > 1 and b.n > 1:
        return verdict(a, b)
    if a.n > 1 or b.n > 1:
        std = a.std if a.n > 1 else b.std
        assumed = SeedStats(2, a.mean, std), SeedStats(2, b.mean, std)
        return f"{verdict(*assumed)} (est.)"
    return "?"


def no_adapter(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {
        r["task"]: float(r[key])
        for r in rows
        if r.get("label") == NO_ADAPTER and r.get("status") == "ok" and r.get(key) is not None
    }


def _cell(s: SeedStats | None, spec: str) -> str:
    return "-" if s is None else s.cell(spec)


def _gain(base: float | None, s: SeedStats | None) -> str:
    return "-" if base is None or s is None or math.isnan(s.mean) else f"{base - s.mean:+.1f}"


def table(dit_rows: list[dict[str, Any]], unet_rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per task and method, DiT and U-Net side by side."""
    nets = {r.get("feature_network") for r in dit_rows + unet_rows if r.get("feature_network")}
    counts = {(r.get("num_generated"), r.get("num_reference")) for r in dit_rows + unet_rows if r.get("status") == "ok"}
    fid = pool_seeds(dit_rows, "fid"), pool_seeds(unet_rows, "fid")
    kid = pool_seeds(dit_rows, "kid_mean"), pool_seeds(unet_rows, "kid_mean")
    base = no_adapter(dit_rows, "fid"), no_adapter(unet_rows, "fid")
    tasks = sorted({t for t, _ in fid[0]} & {t for t, _ in fid[1]})
    out = [
        f"FID / KID on {', '.join(sorted(nets)) or '?'} features; (generated, reference) images: "
        f"{sorted(counts, key=str)}" + ("  **the two runs differ: not comparable**" if len(nets) > 1 else ""),
        "",
        "| task | method | DiT FID | U-Net FID | DiT gain | U-Net gain | DiT vs U-Net (FID) | DiT KID | U-Net KID |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for task in tasks:
        for m in METHODS:
            key = (task, m)
            if key not in fid[0] or key not in fid[1]:
                continue
            out.append(
                f"| {task} | {m} | {_cell(fid[0][key], '.1f')} | {_cell(fid[1][key], '.1f')} | "
                f"{_gain(base[0].get(task), fid[0][key])} | {_gain(base[1].get(task), fid[1][key])} | "
                f"{judge(fid[0][key], fid[1][key])} | {_cell(kid[0].get(key), '.4f')} | "
                f"{_cell(kid[1].get(key), '.4f')} |"
            )
        d, u = base[0].get(task), base[1].get(task)
        out.append(
            f"| {task} | {NO_ADAPTER} | {'-' if d is None else f'{d:.1f}'} | {'-' if u is None else f'{u:.1f}'} "
            "| | | | | |"
        )
    if not tasks:
        out.append("| (no task has fine-tune rows in both runs) | | | | | | | | |")
    out += [
        "",
        "gain = the architecture's no-adapter FID minus the method's (what fine-tuning bought). (est.) = one "
        "side has a single seed and is assumed to spread as the other side does.",
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dit", type=Path, help="fid.json of the DiT run (make compare or make compare-matched)")
    parser.add_argument("unet", type=Path, help="fid.json of the U-Net run (make compare-unet)")
    args = parser.parse_args(argv)
    check_arch(args.dit, "dit")
    check_arch(args.unet, "unet")
    print("\n".join(table(read_rows(args.dit), read_rows(args.unet))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
