"""Qwen-Image family: the MMDiT, Qwen2.5-VL text conditioning, the adapter (edit references),
registry entries, loaders and the tiny random-weight checkpoints. The VAE is the Wan2.1 VAE
(engine/models/wan/vae.py). Importing the package is cheap; `engine.families` imports `family`.
"""
