"""Helpers the service tests share."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid

import grpc
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc, types_pb2
from PIL import Image

from services.common import db
from services.common.objectstore import open_store
from services.common.settings import GatewaySettings
from services.common.spec import Spec
from services.gateway.uploads import Uploads
from services.jobs.records import JobRecord, JobStatus
from tests.conftest import ServiceEnv


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


def png_bytes(size: int = 32) -> bytes:
    """A small PNG of random pixels (its bytes, and so its key, differ per call)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


async def stored_upload(
    env: ServiceEnv, data: bytes, tenant: str = "tests", content_type: str = "image/png"
) -> str:
    """The key of `data` uploaded by `tenant` (the tenant of the mesh's key by default): granted
    as /api/uploads/presign grants it, then written to the store as the client's PUT would."""
    objects = open_store(env.settings(GatewaySettings))
    pool = await db.connect(env.database_url)
    try:
        digest = hashlib.sha256(data).hexdigest()
        upload = await Uploads(objects, pool, 600).presign(tenant, content_type, digest, len(data))
    finally:
        await pool.close()
    await objects.put(upload.key, data, content_type)
    return upload.key


def queued_job(tenant: str = "tests") -> JobRecord:
    """A queued job as a gateway admits it, of `tenant` (by default the tenant of the mesh's
    key, so that the test's stubs can read it)."""
    return JobRecord(
        tenant=tenant,
        id=str(uuid.uuid4()),
        status=JobStatus.QUEUED,
        spec=Spec(
            prompt=f"a kite {uuid.uuid4().hex}",
            model="tiny-sd",
            width=64,
            height=64,
            steps=4,
            num_variants=1,
            seed=3,
            guidance_scale=7.5,
        ),
        cache_key="written-by-the-test",
        cost_cents=1,
    )


async def run_to_end(
    images: image_service_pb2_grpc.ImageServiceStub, job_id: str, within: float = 60.0
) -> types_pb2.Job:
    """The job as its final event reports it (WatchJob to the end, within `within` seconds)."""
    call = images.WatchJob(image_service_pb2.WatchJobRequest(job_id=job_id))

    async def final() -> types_pb2.Job:
        async for response in call:
            if response.event.HasField("final"):
                job: types_pb2.Job = response.event.final.job
                return job
        raise AssertionError("the stream ended without a final event")

    try:
        return await asyncio.wait_for(final(), within)
    finally:
        call.cancel()
