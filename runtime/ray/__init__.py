"""tidal on Ray Serve (the `tidal[ray]` extra): several tidal replicas, one device each, behind one
OpenAI-compatible endpoint. Ray's model multiplexing decides which replica owns which models; tidal's scheduler
decides, inside each replica, what is on its device, offloaded or preempted. See docs/SCALING.md.

`tidal serve --ray --replicas N --config serve.toml` runs it (`app.run`); `serve run tidal.ray.app:build
config=serve.toml` deploys it on an existing cluster (`app.build`). Importing this package imports neither ray
nor torch; its modules that need ray import it."""
from .config import RayConfig

__all__ = ["RayConfig"]
