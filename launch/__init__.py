"""Launchers for trainlib recipes.

`train_ddp.sh` starts any recipe under torchrun on one node or several, in the foreground or in
the background; `slurm_example.sbatch` is an example multi-node Slurm batch script. See
docs/launching.md.
"""
