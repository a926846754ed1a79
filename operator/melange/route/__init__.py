"""Routing: what a gateway in front of a Mélange fleet needs to send each request to a GPU type.

The routing table itself is pure plan logic (`melange.plan.routing`: the share of each bucket's
requests per GPU type, and `pick`, the choice of a type for one request), so the operator can
publish it. Here: `request` reads a request's lengths from its body (pure); `proxy` is
`melange route`, the HTTP proxy that applies a table; `kube` watches the Kubernetes objects it
follows (the table's ConfigMap, the engines' EndpointSlices), the one module here that imports
the Kubernetes client, so that the router needs no restart when either changes.
"""
