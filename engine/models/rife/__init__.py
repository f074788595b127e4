"""RIFE v4.x frame interpolation (Practical-RIFE's IFNet): raises a decoded clip's frame rate.

`ifnet.py` the model, `loader.py` the published `flownet.pkl` variants, `interpolator.py` the
timing, scene cuts and batching, `tiny.py` a random test model. Used by the decode stage for a
request's `target_fps`.
"""
from engine.models.rife.interpolator import RifeInterpolator, frame_plan, output_count

__all__ = ["RifeInterpolator", "frame_plan", "output_count"]
