"""Built-in datasets: the procedural shapes world and sklearn's 8x8 handwritten digits."""

DATASETS = (
  'shapes',
  'digits',
  'shapes_new',
)  # data.dataset values; the data comes from these modules.
