"""gptlaunch's Hydra launcher (hydra/launcher=gptlaunch): one Slurm job per group of sweep points with equal
resources, every point validated and planned before any is submitted. Hydra finds it by scanning the
`hydra_plugins` namespace package; configs/config.yaml selects it."""
