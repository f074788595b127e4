"""HunyuanVideo-1.5 (text-to-video and image-to-video, 480p / 720p, distilled variants)."""
