"""Data: the nucleus record every reader returns, the dataset readers, training/validation datasets,
the prompter's point targets, augmentations and synthetic data.
"""
