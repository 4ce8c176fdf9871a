"""Pictures a person reads: :mod:`.grids` (every image grid, labelled figures with titles and axis labels, files
that are never overwritten). The sample grids of training (``training.module``), diffusion.sample, figures, compare, evaluate and the app build on it.
"""
