"""`python -m recipes.panollava` / `torchrun --nproc_per_node=N -m recipes.xca`."""
from trainlib.recipe import exit_process, main

from . import recipe

exit_process(main(recipe))
