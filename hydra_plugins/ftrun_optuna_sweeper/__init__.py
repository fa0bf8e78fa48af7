"""ftrun's Optuna sweeper: a Hydra Sweeper that drives Optuna's ask/tell API (Optuna >= 4).

`hydra/sweeper=ftrun_optuna` (see conf/hparams_search/optuna_lr_rank.yaml). Each trial is one Hydra job of the
runner; the value the job returns (runner/cli.py main(): the sweep metric, or +/-inf for a failed job) is told back
to the study. The package lives under the `hydra_plugins` namespace because Hydra only instantiates plugins from
there; `hydra_plugins` itself has no __init__.py, so other installed Hydra plugins share it.
"""
