"""Networks: a residual MLP for vectors and a DDPM++-style U-Net for images.

Both are called as ``net(x, t)`` with continuous times ``t`` of shape ``(B,)``.
"""

from .embedding import ClassEmbedding, FourierFeatures, TimeEmbedding, sinusoidal_embedding
from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet", "TimeEmbedding", "ClassEmbedding", "FourierFeatures", "sinusoidal_embedding"]
