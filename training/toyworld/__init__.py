"""The toy world: a video generator with known motion, a tiny Wan2.1 VAE, a toy text encoder and a tiny Wan2.1
T2V teacher, all trained on this machine so PARE's claims can be measured without downloading Wan."""
