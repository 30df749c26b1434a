"""Scripts: make datasets, train, evaluate, caption a folder."""
