"""The one place where core errors become gRPC status codes."""

from __future__ import annotations

import grpc

from tabserve_server import errors

STATUS_OF: dict[type[errors.ServingError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.DecisionNotRecorded: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: errors.ServingError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL
