"""Pictures a person reads: :mod:`.grids` (every image grid, labelled figures with titles and axis labels, files
that are never overwritten). The CLIs that draw figures (figures, compare, report, evaluate) build on it.
"""
