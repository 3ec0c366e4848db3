"""Optuna hyper-parameter search over a recipe, then the final training with the best values.

    python -m launch.hyperopt recipe=pdan hpo.n_trials=20
    torchrun --nproc_per_node=4 -m launch.hyperopt recipe=pdan hpo.n_trials=20 hpo.storage=sqlite:///pdan.db
    python -m launch.hyperopt recipe=pdan --skip-hyperopt --hyperparams-file runs/pdan_hpo/best_hyperparams.json
    python -m launch.hyperopt recipe=mypkg.myrecipe hpo.n_trials=20         # a recipe package of your own

`recipe=` is resolved by trainlib.recipe.find_recipe: a name registered in the `trainlib.recipes`
entry-point group, or a module path. The study is trainlib/hpo.py (its search space
trainlib/search_space.py, its trials trainlib/trials.py); see docs/hyperopt.md and
`python -m launch.hyperopt --help`.
"""
import sys

from trainlib.hpo import main
from trainlib.recipe import exit_process

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
