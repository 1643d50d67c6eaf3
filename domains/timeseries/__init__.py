"""The time-series domain: windows of multichannel series (Diffusion-TS / PaD-TS setting)."""
