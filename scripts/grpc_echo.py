#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for the end-to-end tests of gRPC through the
proxy (tests/tests/e2e/protocols.rs). No generated code: the methods of `echo.Echo`
take and return raw bytes, which is what gRPC carries on the wire anyway.

  grpc_echo.py serve [--cert PEM --key PEM]
      Serves on 127.0.0.1 (a free port, printed on the first line of stdout): TLS with
      that certificate (ALPN h2, as grpcio does), else plain HTTP/2 (h2c). Every call
      must carry `authorization` equal to $EXPECTED_AUTHORIZATION, else it fails
      UNAUTHENTICATED: the server checks the credential the proxy injected.
        /echo.Echo/Unary   answers one JSON message: the request and the metadata seen
        /echo.Echo/Stream  the request is a count N; answers N JSON messages

  grpc_echo.py call TARGET (--unary | --stream N) [--ca PEM] [--authority HOST:PORT]
                    [--proxy-authorization VALUE] [--no-proxy]
      One call, as an agent's SDK makes it: TLS trusting --ca (secure channel), else
      plain h2c. grpcio takes its proxy from grpc_proxy / https_proxy / http_proxy
      (a CONNECT, with the URL's user and password as Basic credentials); --no-proxy
      connects to TARGET itself (the proxy's port, with :authority --authority).
      Prints one JSON line: {"ok": true, "responses": [...], "trailing": {...}} or
      {"ok": false, "code": "UNAUTHENTICATED", "details": "...", "trailing": {...}}.
"""

import argparse
import json
import os
import sys
from concurrent import futures

import grpc

SERVICE = "echo.Echo"


def metadata_dict(pairs):
    return {key: value for key, value in (pairs or []) if isinstance(value, str)}


def serve(args):
    expected = os.environ.get("EXPECTED_AUTHORIZATION", "")

    def checked(context):
        seen = metadata_dict(context.invocation_metadata())
        if not expected or seen.get("authorization") != expected:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the upstream got authorization %r" % seen.get("authorization"),
            )
        return seen

    def unary(request, context):
        seen = checked(context)
        return json.dumps({"request": request.decode(), "metadata": seen}).encode()

    def stream(request, context):
        seen = checked(context)
        for i in range(int(request.decode())):
            yield json.dumps({"i": i, "metadata": seen}).encode()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    if args.cert:
        with open(args.key, "rb") as key, open(args.cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(args):
    options = []
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    if args.no_proxy:
        options.append(("grpc.enable_http_proxy", 0))
    if args.ca:
        with open(args.ca, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(ca.read())
        channel = grpc.secure_channel(args.target, credentials, options)
    else:
        channel = grpc.insecure_channel(args.target, options)
    metadata = []
    if args.proxy_authorization:
        metadata.append(("proxy-authorization", args.proxy_authorization))
    try:
        if args.stream is None:
            response, rpc = channel.unary_unary("/%s/Unary" % SERVICE).with_call(
                b"hello", metadata=metadata, timeout=20
            )
            out = {
                "ok": True,
                "responses": [json.loads(response)],
                "trailing": metadata_dict(rpc.trailing_metadata()),
            }
        else:
            responses = channel.unary_stream("/%s/Stream" % SERVICE)(
                str(args.stream).encode(), metadata=metadata, timeout=20
            )
            out = {"ok": True, "responses": [json.loads(r) for r in responses]}
            out["trailing"] = metadata_dict(responses.trailing_metadata())
    except grpc.RpcError as error:
        out = {
            "ok": False,
            "code": error.code().name,
            "details": error.details(),
            "trailing": metadata_dict(error.trailing_metadata()),
        }
    print(json.dumps(out), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve")
    server.add_argument("--cert")
    server.add_argument("--key")
    client = commands.add_parser("call")
    client.add_argument("target")
    kind = client.add_mutually_exclusive_group(required=True)
    kind.add_argument("--unary", action="store_true")
    kind.add_argument("--stream", type=int)
    client.add_argument("--ca")
    client.add_argument("--authority")
    client.add_argument("--proxy-authorization")
    client.add_argument("--no-proxy", action="store_true")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
    else:
        call(args)


if __name__ == "__main__":
    sys.exit(main())
