"""`python -m recipes.segformer` / `torchrun --nproc_per_node=N -m recipes.segformer`."""
from trainlib.recipe import main

from . import recipe

raise SystemExit(main(recipe))
