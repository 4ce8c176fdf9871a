"""The run machinery around the library: what every CLI needs to turn a configuration into a run and report it.

:mod:`.jobs` (which job and rank this is), :mod:`.errors` (one-line refusals and faults, exit 2 / 1), :mod:`.config`
(the Hydra config directory, resolvers, the run's saved config), :mod:`.outputs` (nothing a user had is lost),
:mod:`.ddp` (re-launched ranks, one run directory for all ranks), :mod:`.cluster` and :mod:`.requeue` (SLURM and
submitit), :mod:`.sweeps` (``-m``, Optuna), :mod:`.wandb_runs` (offline W&B, results added to a training run),
:mod:`.preflight` (a training run's checks before any work) and :mod:`.sampling` (what the sampling CLIs share).
The package imports nothing itself: each CLI imports the modules it uses, torch-free ones first.
"""
