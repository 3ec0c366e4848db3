"""`python -m recipes.pdan` / `torchrun --nproc_per_node=N -m recipes.pdan`."""
from trainlib.recipe import exit_process, main

from . import recipe

exit_process(main(recipe))
