"""Analysis of a study's MLflow records: scaling curves, paired effects, plots, report.

Runs on a laptop: imports neither torch nor Ray (a test checks), only `scaling.names` and
`scaling.errors` from the training package. Modules:

- `load`: the one module that talks to MLflow (read runs into Polars, log the analysis run);
- `fit`: pure power-law / trend / bootstrap mechanics returning frozen dataclasses;
- `downstream`: which evaluation checkpoint to report (chosen on validation data) and the
  paper's accuracy table;
- `effects`: paired arm differences, effective-parameter multiplier, lambda*(N) rule, and
  the paper's claims with verdicts read off their confidence intervals;
- `plots`, `report`: figures, tables, the markdown report and its self-contained HTML twin;
- `scaling_curves`: the command line (`python -m analysis.scaling_curves --help`).
"""
