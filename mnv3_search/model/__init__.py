"""Spec -> nn.Module in torchvision's layout, its state_dict keys, checkpoints, and exact counts."""

from .build import MobileNetV3, build_model, count_params

__all__ = ["MobileNetV3", "build_model", "count_params"]
