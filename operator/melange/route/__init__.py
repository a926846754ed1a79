"""Routing: what a gateway in front of a Mélange fleet needs to send each request to a GPU type.

The routing table itself is pure plan logic (`melange.plan.routing`: the share of each bucket's
requests per GPU type, and `pick`, the choice of a type for one request), so the operator can
publish it. Here: `request` reads a request's lengths from its body (pure); `proxy` is
`melange route`, the HTTP proxy that applies a table (the only module here that does network I/O).
"""
