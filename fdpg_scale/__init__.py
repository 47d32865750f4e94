"""fdpg-scale: f-divergence policy gradients (f-DPG) toward any evaluable target distribution."""

__version__ = "0.1.0"
