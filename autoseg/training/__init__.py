"""Training: cross-validation splits, losses, patch sampling, augmentation, the training loop and checkpoints."""
