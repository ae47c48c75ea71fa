"""toroidal: attention on a ring of positions stacked into D platters.

`import toroidal` does not import torch: the names below are imported on first use
(`toroidal.runtime.lazy`), and `from toroidal import ToroidalAttention` works as usual.
"""

from typing import TYPE_CHECKING

from toroidal.runtime.lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["ToroidalAttention", "ToroidalConfig", "toroidal_attention", "__version__"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "ToroidalAttention": "toroidal.attention",
        "ToroidalConfig": "toroidal.config",
        "toroidal_attention": "toroidal.functional",
    },
)

if TYPE_CHECKING:
    from toroidal.attention import ToroidalAttention
    from toroidal.config import ToroidalConfig
    from toroidal.functional import toroidal_attention
