"""hydra/sweeper=optuna (optuna_sweeper.py)."""
