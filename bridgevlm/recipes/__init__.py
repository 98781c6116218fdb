"""Recipes: a typed config plus the narrated sequence that runs it (build, data, train, evaluate, save)."""
