"""Evaluation: metrics as pure numpy functions, their MONAI/ignite adapters, dataset scoring, prediction
sources and the training-free baseline.
"""
