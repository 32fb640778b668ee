"""Pretrained backbone weights: the loader, and (not in git) the weight files themselves."""

from pretrained.load import LoadReport, WeightsError, load_backbone_weights

__all__ = ["LoadReport", "WeightsError", "load_backbone_weights"]
