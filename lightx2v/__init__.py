"""The library facade: `from lightx2v import LightX2V`."""
from lightx2v.api import LightX2V

__all__ = ["LightX2V"]
