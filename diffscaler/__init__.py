"""DiffScaler: pretrain one DiT with Ray Train + DeepSpeed, scale it to many datasets with Affiners."""

__version__ = "0.1.0"
