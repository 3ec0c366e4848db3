"""`python -m recipes.pdan` / `torchrun --nproc_per_node=N -m recipes.pdan`."""
from trainlib.recipe import main

from . import recipe

raise SystemExit(main(recipe))
