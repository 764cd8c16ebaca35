"""Image tokenizers (images <-> latents) and patchify (latents <-> tokens)."""
