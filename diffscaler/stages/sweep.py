"""The sweep stage: Ray Tune over adapter rank and learning rate per dataset (and per method of
sweep.methods), the best by FID (diffscaler.train.sweep); writes best.json, trials.csv and the winners.

Valid when the run before finished a sweep with the same search fingerprints (best.json does not record
its search; the manifest does) and every winner was trained on this backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffscaler.artifacts import AdapterLoadError, read_trained_meta
from diffscaler.stages.base import InputError, Run, Stage, StageCheck, StageFailed
from diffscaler.stages.inputs import require_targets_and_backbone
from diffscaler.train.finetune import FinetuneInputError
from diffscaler.train.sweep import SweepResult, refuse_unet_sweep, run_sweep, sweep_fingerprints


def _best(run: Run) -> dict[str, Any]:
    try:
        return json.loads((run.layout.sweep_dir / "best.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def swept_entries(run: Run) -> dict[str, dict[str, Any]]:
    """best.json rows keyed as the fingerprints are: dataset (first method), method/dataset (the others)."""
    best = _best(run)
    out = dict(best.get("datasets", {}))
    for m, rows in list(best.get("methods", {}).items())[1:]:
        out |= {f"{m}/{name}": row for name, row in rows.items()}
    return out


def swept_lrs(run: Run) -> dict[str, float]:
    """{method: lr} the sweep chose (best.json, on its first dataset), for finetune.lr_from_sweep."""
    best = _best(run)
    if not best:
        return {}
    methods = best.get("methods") or {run.cfg.adapter.method: best.get("datasets", {})}
    return {m: float(next(iter(rows.values()))["lr"]) for m, rows in methods.items() if rows}


def swept_adapters(run: Run) -> dict[str, str]:
    """{dataset: winning adapter file} from best.json ({} before the sweep)."""
    return {name: row["adapter"] for name, row in _best(run).get("datasets", {}).items() if row.get("adapter")}


class SweepStage(Stage):
    name = "sweep"

    def preflight(self, run: Run) -> None:
        try:
            refuse_unet_sweep(run.cfg)
        except FinetuneInputError as err:
            raise InputError(str(err)) from None
        require_targets_and_backbone(run)

    def check(self, run: Run) -> StageCheck:
        if not run.backbone.is_file():
            return StageCheck(False, "no backbone yet")
        try:
            wanted = sweep_fingerprints(run.cfg, run.backbone)
        except FinetuneInputError as err:
            return StageCheck(False, str(err))
        previous = run.previous_outputs(self.name)
        if previous is None or previous.get("fingerprints") != wanted:
            return StageCheck(False, "no finished sweep with this search space and backbone")
        winners, backbone_hash = swept_entries(run), run.backbone_hash()
        for name in wanted:
            try:
                meta = read_trained_meta(winners.get(name, {}).get("adapter", ""))
            except (AdapterLoadError, OSError) as err:
                return StageCheck(False, f"the best adapter of {name!r} is missing ({err})")
            if meta.get("backbone_hash") != backbone_hash:
                return StageCheck(False, f"the best adapter of {name!r} was trained on another backbone")
        return StageCheck(True, f"best (rank, lr) found for {', '.join(wanted)}")

    def search(
        self, run: Run, *, adapter_dir: str | Path | None = None, storage_path: str | None = None, run_fid: bool = True
    ) -> SweepResult:
        """Tune (resuming a cut-off experiment), FID on the best trials, outputs (ray_jobs.sweep calls this)."""
        return run_sweep(
            run.cfg,
            run.backbone,
            run.layout.sweep_dir,
            adapter_dir=adapter_dir,
            storage_path=storage_path,
            run_fid=run_fid,
            log=run.log,
        )

    def run(self, run: Run) -> dict[str, Any]:
        fingerprints = sweep_fingerprints(run.cfg, run.backbone)
        result = self.search(run)
        first = next(iter(result.by_method), "")
        found = {name if m == first else f"{m}/{name}" for m, rows in result.by_method.items() for name in rows}
        missing = [name for name in fingerprints if name not in found]
        folder = run.layout.sweep_dir
        if missing:
            raise StageFailed(f"no trial finished a rung for {missing}; see {folder / 'trials.csv'}")
        return {
            "best_json": str(folder / "best.json"),
            "best": result.best,
            "trials_csv": str(folder / "trials.csv"),
            "fingerprints": fingerprints,
        }
