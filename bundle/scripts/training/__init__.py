"""Training: engine pieces (batches, objectives, evaluation steps), checkpoints, distributed helpers and
MLflow tracking.
"""
