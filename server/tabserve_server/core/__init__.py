"""Protocol-free core: feature schema and validation, loaded models, the version manager, the data plane."""
