"""lit-rlhf: reward modelling, PPO and DPO for small chat models, in PyTorch Lightning.

    from lit_rlhf import DPOModule, PreferenceDataModule, sequence_scores

Names are imported on first use, so `import lit_rlhf.ops` (pure torch) stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "RewardModule": "lit_rlhf.reward",
    "DPOModule": "lit_rlhf.dpo",
    "PPOModule": "lit_rlhf.ppo",
    "PreferenceDataModule": "lit_rlhf.data",
    "sequence_logps": "lit_rlhf.forward",
    "sequence_scores": "lit_rlhf.forward",
    "cli": "lit_rlhf.cli",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lit_rlhf' has no attribute {name!r}")
