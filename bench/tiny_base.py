"""Measure the tiny base: train `recipes/tiny/base.yaml` from scratch and print held-out accuracy
and wall time (the README's figures come from this script).

    python bench/tiny_base.py [key=value ...]
"""

import json
import sys
import tempfile
import time

from train.recipe import BASE_RECIPE, load_recipe
from train.run import run_recipe


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(BASE_RECIPE, [f"output={tmp}/run", f"data.cache_dir={tmp}/data", *overrides])
        started = time.time()
        metrics = run_recipe(recipe)
        wall = time.time() - started
    print(
        json.dumps(
            {
                "recipe": str(BASE_RECIPE),
                "overrides": overrides,
                "wall_seconds_including_data_and_eval": round(wall, 1),
                **metrics,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
