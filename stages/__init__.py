"""The pipeline as plain Python: request type, typed payloads, stages, local pipeline. No Ray."""
