"""The Wan2.1 T2V DiT sizes the benchmarks run (`WanDiTConfig` keyword arguments), in one place.

"1.3b" and "14b" are the real release sizes (/work/shared/notes/models.md); "tiny" is for CPU
smoke runs of the scripts.
"""
DIT_SIZES: dict[str, dict] = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40),
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2),
}
