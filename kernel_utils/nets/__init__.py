"""The kit's networks, built by name: `create_model(cfg, in_channels)`. timm backbones in 2D, MONAI in 3D.

Importing this package registers every network (the registry itself imports none of them).
"""

from kernel_utils.nets import fracture_nets, localisation_nets, vit3d  # noqa: F401  (each registers its networks)
from kernel_utils.nets.registry import REGISTRY, create_model, register

__all__ = ["REGISTRY", "create_model", "register"]
