"""tabserve model server: scores tabular rows with a model from an MLflow registry over gRPC."""
