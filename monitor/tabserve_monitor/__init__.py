"""tabserve monitor: the sidecar that polls the MLflow registry and states the aspired version to the server."""
