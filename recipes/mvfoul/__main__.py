"""`python -m recipes.mvfoul` / `torchrun --nproc_per_node=N -m recipes.mvfoul`."""
from trainlib.recipe import exit_process, main

from . import recipe

exit_process(main(recipe))
