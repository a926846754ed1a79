"""Routing: what a gateway in front of a Mélange fleet needs to send each request to a GPU type.

`table` turns a plan into a routing table (pure): the share of each bucket's requests per GPU type,
by input length alone (output length unknown on arrival) and by input and output length (for
clients whose `max_tokens` can be trusted), and `pick`, the choice of a type for one request.
`request` reads a request's lengths from its body (pure); `proxy` is `melange route`, the HTTP
proxy that applies a table (the only module here that does network I/O).
"""
