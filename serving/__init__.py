"""Ray Serve: one deployment per pipeline stage, the ingress (OpenAI-compatible Videos API),
the job store and the app builder (`serving.app:build_app`) that serve_config.yaml names."""
