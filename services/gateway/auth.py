"""Who is calling the gateway, and what they may do: API keys on both edges, and the HTTP
facade's Host and Origin checks.

gRPC: an interceptor reads the `authorization` metadata (`Bearer <key>`) of every ImageService
and CostService call, checks the method's scope and puts the `Caller` where the servicer reads it
(`current_caller`). Health and reflection stay open (probes carry no key). HTTP: each route
declares its scope in the route table (`authorized`); the page, `/healthz` and signed file URLs
need no key. Servicers and routes pass the Caller to JobService, which confines every read and
change to the caller's tenant.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import grpc
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from services.common.errors import DisallowedHost, Forbidden, ServiceError, Unauthenticated
from services.common.interceptors import HandlerInterceptor
from services.gateway.http_input import error_response
from services.tenants.keys import Caller, KeyStore, Scope

_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    """The caller of the gRPC call being served (set by AuthInterceptor)."""
    caller = _caller.get()
    if caller is None:
        raise Unauthenticated("a valid API key is required")
    return caller


def require(caller: Caller, scope: Scope) -> Caller:
    if scope not in caller.scopes:
        raise Forbidden(f"this key lacks the {scope.value!r} scope")
    return caller


class Authenticator:
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def caller(self, authorization: str, scope: Scope) -> Caller:
        """The caller an `Authorization` value (`Bearer <key>`) stands for, with `scope`."""
        kind, _, key = authorization.strip().partition(" ")
        if kind.lower() != "bearer" or not key.strip():
            raise Unauthenticated("a valid API key is required: Authorization: Bearer <key>")
        return require(await self._keys.authenticate(key.strip()), scope)


# gRPC


class AuthInterceptor(HandlerInterceptor):
    """Authenticates every call of the methods in `scopes` (full method name -> scope)."""

    def __init__(self, authenticator: Authenticator, scopes: dict[str, Scope]) -> None:
        self._auth = authenticator
        self._scopes = scopes

    def _authenticate(self, call: grpc.HandlerCallDetails) -> Callable[[], Awaitable[None]] | None:
        """What puts the call's Caller in place; None for methods that need no key."""
        scope = self._scopes.get(call.method)
        if scope is None:
            return None
        authorization = ""
        for key, value in call.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                authorization = value

        async def authenticate() -> None:
            _caller.set(await self._auth.caller(authorization, scope))

        return authenticate

    def wrap_unary(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        authenticate = self._authenticate(call)
        if authenticate is None:
            return behaviour

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await authenticate()
            return await behaviour(request, context)

        return unary

    def wrap_stream(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        authenticate = self._authenticate(call)
        if authenticate is None:
            return behaviour

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await authenticate()
            async for response in behaviour(request, context):
                yield response

        return streaming


def method_scopes(
    services: Iterable[Any], generate: Iterable[str], default: Scope = Scope.READ
) -> dict[str, Scope]:
    """Every method of the given service descriptors: `default`, or GENERATE for the method
    names in `generate`."""
    writes = set(generate)
    return {
        f"/{service.full_name}/{method.name}": Scope.GENERATE if method.name in writes else default
        for service in services
        for method in service.methods
    }


# HTTP

Endpoint = Callable[[Request], Awaitable[Response]]


def authorized(authenticator: Authenticator, scope: Scope, endpoint: Endpoint) -> Endpoint:
    """The route's endpoint behind a key with `scope`; the caller is in `request.state.caller`."""

    async def guarded(request: Request) -> Response:
        request.state.caller = await authenticator.caller(
            request.headers.get("authorization", ""), scope
        )
        return await endpoint(request)

    return guarded


def caller_of(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller


class HostOriginGuard:
    """Refuses a request whose Host is not an allowed name (DNS rebinding: a hostile page's
    domain that resolves to this server), and one whose Origin is neither the page's own nor
    an allowed one (a cross-site request from a page the user happens to visit)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        self._any_host = "*" in hosts
        self._hosts = {h.lower() for h in hosts}
        self._origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        problem: ServiceError | None = None
        if not self._any_host and _hostname(host) not in self._hosts:
            problem = DisallowedHost()
        origin = headers.get("origin")
        if problem is None and origin is not None:
            own = f"{scope.get('scheme', 'http')}://{host}".lower()
            if origin.lower() not in (own, *self._origins):
                problem = Forbidden("cross-site requests from this origin are not allowed")
        if problem is not None:
            await error_response(problem)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The host name of a Host header, without its port ("[::1]:8080" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(configured: str, public_base_url: str) -> list[str]:
    hosts = {"localhost", "127.0.0.1", "[::1]"}
    public = urlsplit(public_base_url).hostname
    if public:
        hosts.add(f"[{public}]" if ":" in public else public)
    hosts |= {h.strip().lower() for h in configured.split(",") if h.strip()}
    return sorted(hosts)


def allowed_origins(configured: str, public_base_url: str) -> list[str]:
    origins = {public_base_url.rstrip("/")} if public_base_url else set()
    return sorted(origins | {o.strip() for o in configured.split(",") if o.strip()})
