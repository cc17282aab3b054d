"""The paper's mathematics: shapes and the search space, costs, Gumbel sampling, CWI, losses, optimisers, schedules.

Pure functions and small records: no Flax modules, no devices, no files
beyond the shape records themselves.
"""
