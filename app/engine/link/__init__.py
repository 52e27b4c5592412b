"""The worker <-> engine link: front-end worker processes ask one engine process per device the verbs of
`facade.Plane` over a Unix socket, and hand it image tensors through shared memory.

    wire.py    framing: length-prefixed pickled tuples (both ends are our own processes, on a private socket)
    shm.py     a worker's shared-memory arena (it writes tensors, the engine writes logits), and the
               engine's view of every worker's arena
    server.py  the engine side: one session per worker, serving a DataPlane
    client.py  the worker side: RemotePlane, a facade.Plane that asks the engine
"""
