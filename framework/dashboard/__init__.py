"""The vmsdb dashboard: services and their event dataflow with live rates, a correlation's chain of
events, dead letters (replay, discard), leases, recovery and integrity, in one web page.

``vmsdb dashboard APP [--port N]`` serves it on 127.0.0.1; :func:`create_dashboard` mounts it
into an application of your own (behind your own authentication)::

    api.mount("/vmsdb", create_dashboard(app))

and :func:`serving_dashboard` serves it next to a running App for a while (``vmsdb eshop demo
--dashboard``).
"""

from framework.dashboard._app import create_dashboard, serving_dashboard

__all__ = ["create_dashboard", "serving_dashboard"]
