"""Orchestration outside the training process: configs, Ray Train/Tune launch, MLflow, tables, CLI.

Lives in platform/semiseg rather than a top-level `platform` package, which would shadow Python's
standard `platform` module and break `import torch`.
"""
