"""The Wan DiT sizes the benchmarks run (`WanDiTConfig` keyword arguments), in one place.

"1.3b" and "14b" are the real Wan2.1 T2V release sizes (../shared/notes/models.md; each Wan2.2
A14B expert has the "14b" shape), "ti2v-5b" the Wan2.2 TI2V-5B one (engine/models/wan/specs.py
`TI2V_5B`: 48 latent channels in and out); "tiny" and "ti2v-tiny" are for CPU smoke runs of the
scripts.
"""
DIT_SIZES: dict[str, dict] = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40),
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2),
    "ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30),
    "ti2v-tiny": dict(num_attention_heads=2, attention_head_dim=32, in_channels=48, out_channels=48,
                      text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2),
}
