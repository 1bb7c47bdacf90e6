"""gptlaunch's Optuna sweeper (hydra/sweeper=optuna), over Optuna 4's ask/tell API, in place of hydra-optuna-sweeper
(whose last release caps optuna<3). Hydra finds it by scanning the `hydra_plugins` namespace package."""
