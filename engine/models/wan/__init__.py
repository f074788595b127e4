"""Wan2.1 family: DiT, VAE, encoders, key maps, registry entries and loaders.

Importing the package is cheap; the registry imports `specs` on first lookup and the family
loaders are imported through `engine.families`.
"""
