"""`python -m recipes.segformer` / `torchrun --nproc_per_node=N -m recipes.segformer`."""
from trainlib.recipe import exit_process, main

from . import recipe

exit_process(main(recipe))
