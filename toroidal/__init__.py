"""toroidal: attention on a ring of positions stacked into D platters."""

from toroidal.attention import ToroidalAttention
from toroidal.config import ToroidalConfig
from toroidal.functional import toroidal_attention

__version__ = "0.1.0"

__all__ = ["ToroidalAttention", "ToroidalConfig", "toroidal_attention", "__version__"]
