"""Helpers the service tests share."""

from __future__ import annotations

import grpc
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields a google.rpc.BadRequest detail of an INVALID_ARGUMENT names."""
    status = rpc_status.from_call(error)
    assert status is not None
    assert status.code == code_pb2.INVALID_ARGUMENT
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields
