"""vtc training: recipes, Lightning adapter, strategies, evaluation and the `vtc` CLI."""
