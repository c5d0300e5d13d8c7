"""Each fine-tune method's parameter share of the backbone, counted on real banks (not a formula).

    rows = method_shares(load_config("ray_jobs/configs/compare-matched.yaml"))
    print(format_shares(rows))

For every method in finetune.methods a fresh backbone of cfg.model gets one task's bank attached with the
method's own rank and wrapped layers (finetune.method_ranks / method_targets over adapter.*), and the
parameters that one task's adapter file holds are counted (its conditioning row included). `scratch`
trains a whole model. Cheap: no data, no training, no cluster (`python -m bench.param_shares`).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffscaler.adapters.bank import AdapterBank, TaskInfo
from diffscaler.config import ExperimentConfig, ModelConfig
from diffscaler.models.dit import build_model


@dataclass(frozen=True)
class ShareRow:
    method: str
    rank: int  # 0 for methods without a rank-r branch
    targets: tuple[str, ...]  # wrapped linears (every linear for full fine-tuning)
    trainable: int  # parameters one task's adapter trains
    backbone: int  # the frozen backbone's parameters

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / self.backbone


def method_shares(cfg: ExperimentConfig) -> list[ShareRow]:
    """One row per finetune.methods entry, counted on a bank attached to a freshly built backbone."""
    from diffscaler.train.finetune import method_adapter, uses_rank  # Ray and the data stack: only when called

    rows = []
    for method in cfg.finetune.methods:
        model = build_model(cfg.model, seed=0)
        if method == "scratch":  # the same network from random init: every parameter trains
            n = model.num_parameters()
            rows.append(ShareRow(method, 0, ("all",), n, n))
            continue
        a = method_adapter(cfg, method)
        bank = AdapterBank.attach(model, [TaskInfo("task")], method=method, rank=a.rank, targets=a.targets)
        targets = ("all linears",) if method == "full" else a.targets
        rows.append(
            ShareRow(
                method,
                a.rank if uses_rank(method) else 0,
                targets,
                bank.trainable_parameters_per_task(0),
                bank.backbone_parameters(),
            )
        )
    return rows


def format_shares(rows: list[ShareRow], title: str = "") -> str:
    lines = [title] if title else []
    lines += [
        "| method | rank | wrapped layers | trainable params per task | % of backbone |",
        "|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.method} | {r.rank or '-'} | {', '.join(r.targets)} | {r.trainable:,} | {r.pct:.2f} % |")
    if rows:
        lines.append(f"\nbackbone: {rows[0].backbone:,} parameters")
    return "\n".join(lines)


def unet_shares(model: ModelConfig, name: str = "UNet-T") -> list[ShareRow]:
    """The U-Net baseline's methods (diffscaler.adapters.conv) at `model`'s size, classes and channels."""
    from dataclasses import replace

    from diffscaler.adapters.conv import CONV_METHODS, ConvBank
    from diffscaler.config import validate_model
    from diffscaler.unet import build_unet

    config = replace(model, arch="unet", name=name)
    validate_model(config)
    rows = []
    for method in CONV_METHODS:
        bank = ConvBank.attach(build_unet(config, seed=0), [TaskInfo("task")], method=method)
        layers = ("all convs and linears",)
        rows.append(ShareRow(method, 0, layers, bank.trainable_parameters_per_task(0), bank.backbone_parameters()))
    return rows
