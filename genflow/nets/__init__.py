"""Shared backbones: they know tensors only (no methods, data or Lightning).

Every net is called as ``net(x, noise_label, cond=None)`` and built with keyword arguments
``data_shape`` and ``num_classes`` (filled in by ``genflow.config.build``) plus its own hyperparameters.
"""
from genflow.nets.adm import PRESETS as ADM_PRESETS
from genflow.nets.adm import ADMUNet
from genflow.nets.mlp import MLP
from genflow.nets.multiview import MultiViewUNet
from genflow.nets.unet import PRESETS as UNET_PRESETS
from genflow.nets.unet import UNet

#: every named architecture: preset name -> (class, hyperparameters)
PRESETS = {name: (UNet, dict(hp)) for name, hp in UNET_PRESETS.items()}
PRESETS.update({name: (ADMUNet, dict(hp)) for name, hp in ADM_PRESETS.items()})

__all__ = ["UNet", "ADMUNet", "MLP", "MultiViewUNet", "PRESETS", "UNET_PRESETS"]
