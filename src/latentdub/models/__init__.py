"""Neural networks of the LatentSync 1.5/1.6-compatible system.

Only the U-Net is exported here; import the others from their modules
(``models.whisper``, ``models.vae``, ``models.scheduler``).
"""

from .unet import DeepCache, UNet3DConditionModel, UNetConfig, unet_config

__all__ = ["DeepCache", "UNet3DConditionModel", "UNetConfig", "unet_config"]
