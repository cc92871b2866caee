"""Python clients of tabserve: scoring (public port) and control (the monitor's API); grpcio, protobuf, numpy only."""

from tabserve_client.channel import Keepalive, TlsOptions
from tabserve_client.client import Feature, ModelInfo, Reason, ScoreBatch, ScoringClient, ScoringError
from tabserve_client.control import ControlClient, ControlError, aspired_version
from tabserve_client.retry import RetryPolicy

__all__ = [
    "ControlClient",
    "ControlError",
    "Feature",
    "Keepalive",
    "ModelInfo",
    "Reason",
    "RetryPolicy",
    "ScoreBatch",
    "ScoringClient",
    "ScoringError",
    "TlsOptions",
    "aspired_version",
]
