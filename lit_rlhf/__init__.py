"""lit-rlhf: reward modelling, PPO and DPO for small chat models, in PyTorch Lightning."""

__version__ = "0.1.0"
