"""dispersion-scaling: scaling studies of embedding condensation and dispersion loss.

Kept import-light on purpose: `analysis` imports `scaling.names` on machines without
torch or Ray, so nothing heavy may be imported here.
"""

__version__ = "0.1.0"
