"""Training: data, losses, trainer (AMP, DDP, EMA, resume), evaluation, codebook retraining."""
