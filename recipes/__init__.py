"""Training recipes: one package per real training system, each built on the trainlib engine."""
