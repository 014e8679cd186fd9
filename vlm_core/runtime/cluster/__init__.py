"""Past one machine: the server's routes on Ray Serve, over N model replicas, with conversation- and
image-aware routing (`vlm-serve -m OUT --ray --replicas N`; the optional 'ray' extra).

One idea per module; only deployments.py, router.py and launch.py's `serve_on_ray` import Ray:

* ``affinity.py``: a request's RoutingKey (session, prefix chain with images by content) and `choose`, the
  replica choice with its imbalance bound. Pure; unit-tested without Ray.
* ``router.py``: the Ray Serve RequestRouter that asks `choose`.
* ``replica.py``: one replica = the plain server's app over one engine, answering forwarded requests.
* ``ingress.py``: the HTTP routes, forwarding each request whole to the chosen replica; /health, /metrics
  for the whole application (``merged_metrics.py``).
* ``deployments.py``: the two Ray Serve deployments and `build_app` (for ``serve run`` / ``serve deploy``).
* ``launch.py``: vlm-serve's --ray options and the local (or --ray-address) start.
"""
