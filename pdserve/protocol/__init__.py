"""The bottom layer: what pdserve's components exchange, and nothing that runs.

Every other package imports from here and this package imports from none of them:

- ``protocol.wire``: the authenticated message envelope (msgspec + HMAC over ZeroMQ), the
  cluster secret and keys derived from it;
- ``protocol.reports``: roles, registration and the load reports instances send the gateway;
- ``protocol.net``: small network and process helpers (ports, loopback checks, cores, flags);
- ``protocol.push``: the thread that pushes load reports and KV holdings to the gateway.

See docs/architecture.md for the whole layer order.
"""
