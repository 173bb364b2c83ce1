"""Scratch servers: throwaway servers on 127.0.0.1 that restores and DR drills start, use and remove.

- `base`: the `ScratchServer` protocol (start, stop, is_running, attach), the shared
  process helpers (free ports, pid files, stopping a pid after checking its command
  line, private unix-socket dirs) and `TargetInfo`, a started target as JSON.
- `postgres`, `redis`, `etcd`, `rabbitmq`, `s3`: one module per server.
- `local`: the kind registry: how each kind of scratch target is made on this worker,
  stopped and removed (the drill's local backend loops over it).

Nothing here starts or connects anything at import.
"""
