"""Pure-functional samplers: per-token integrators, guidance, and the scanned generation loop."""
