"""The multi-process server (`vqtok serve --front-workers N`), a wing a reader of the one-process server can
skip: the same app and routes run in N front processes, and the models in one inference process behind
them, behind the same interfaces (`repository.Repository`, its `Served` versions and their batchers).

    server.py     the supervisor: starts, restarts and stops the inference process and the fronts
    handoff.py    its accept loop: each new connection handed to the next front that can take it
    inference.py  the inference process: the repository, runtimes and batchers; answers the fronts
    front.py      a front's view of it: `RemoteRepository`, whose batchers forward to inference.py
    ipc.py        the control-channel framing and the shared-memory slab that carries pixels and tokens
"""
