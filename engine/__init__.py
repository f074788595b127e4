"""Pure-PyTorch engine: models, layers, kernels, quantization, samplers, parallelism, loading.

Knows nothing of Ray, HTTP or requests.
"""
