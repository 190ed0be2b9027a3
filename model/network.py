"""The classifier: any timm model (SE-ResNet101 by default), random init, one logit per class."""
from __future__ import annotations

import timm
import torch

from common.errors import UserError


def create_model(name: str, num_classes: int, channels_last: bool = False, drop_rate: float = 0.0) -> torch.nn.Module:
    """No pre-trained weights: the competition allowed none."""
    if name not in timm.list_models():
        raise UserError(f"model.name {name!r} is not a timm model (see timm.list_models())")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers, whose state dict keys
    carry no ``module.`` or ``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
