"""Training on Ray: backbone pretraining (Ray Train + DeepSpeed ZeRO) and adapter fine-tuning.

    from diffscaler.train.pretrain import run_pretrain
    result = run_pretrain(cfg, "runs/demo/pretrain")   # -> PretrainResult(backbone, metrics, ...)

Kept import-light on purpose: importing `diffscaler.train` pulls in neither Ray nor DeepSpeed;
each module imports what it needs (DeepSpeed only inside Ray Train workers).
"""
