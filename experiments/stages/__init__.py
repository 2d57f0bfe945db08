"""The stages of a run, one module each: plan, train, predict, score (and test: the selection rules
predicted and scored; record: run.json). experiments.runner composes them."""
