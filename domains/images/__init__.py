"""Images: pixel- and latent-space image diffusion on diffusers."""
