"""Python client of the tabserve scoring service (depends on grpcio, protobuf and numpy only)."""

from tabserve_client.client import Feature, ModelInfo, ScoreBatch, ScoringClient, ScoringError

__all__ = ["Feature", "ModelInfo", "ScoreBatch", "ScoringClient", "ScoringError"]
