"""Orchestration: the CLI, the Ray fit stage, the rounds driver and MLflow tracking."""
