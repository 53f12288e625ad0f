#!/usr/bin/env python3
"""Render envoy/envoy.yaml for `make run`.

Without UPSTREAM_URL the file is used as it is (demo upstream on 127.0.0.1:8090). With
UPSTREAM_URL (e.g. https://dashscope.aliyuncs.com/compatible-mode) the upstream cluster is
pointed at that host over TLS with SNI, the Host header is rewritten, and a path prefix in
the URL is prepended to every request path. Secrets in the environment replace the demo
values of the filter configuration.
"""
import os
import sys
from urllib.parse import urlparse


def main(src: str, dst: str) -> int:
    text = open(src, encoding="utf-8").read()
    secret = os.environ.get("METER_SHARED_SECRET", "demo-shared-secret")
    text = text.replace('"shared_secret": "demo-shared-secret"', f'"shared_secret": "{secret}"')
    provider = os.environ.get("UPSTREAM_PROVIDER")
    if provider:
        text = text.replace('"provider": "openai"', f'"provider": "{provider}"')
    url = os.environ.get("UPSTREAM_URL")
    if url:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            print(f"UPSTREAM_URL must be http(s)://host[:port][/prefix], got {url!r}", file=sys.stderr)
            return 2
        tls = parsed.scheme == "https"
        port = parsed.port or (443 if tls else 80)
        host = parsed.hostname
        prefix = parsed.path.rstrip("/")
        route_old = "route:\n                  cluster: llm_upstream\n"
        route_new = route_old + f"                  host_rewrite_literal: {host}\n"
        if prefix:
            route_new += f'                  prefix_rewrite: "{prefix}/"\n'
        text = text.replace(route_old, route_new)
        endpoint_old = "socket_address: { address: 127.0.0.1, port_value: 8090 }"
        text = text.replace(endpoint_old, f"socket_address: {{ address: {host}, port_value: {port} }}")
        if tls:
            text += (
                "    transport_socket:\n"
                "      name: envoy.transport_sockets.tls\n"
                "      typed_config:\n"
                '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n'
                f"        sni: {host}\n"
            )
    with open(dst, "w", encoding="utf-8") as out:
        out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
