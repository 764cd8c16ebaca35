"""Built-in datasets: the procedural shapes world and sklearn's 8x8 handwritten digits."""
