"""Thin mitmproxy addons around the taskgate core, one concern each.

Order matters and is fixed by :func:`proxy.server.gateway_addons`:
identify → authorize → audit. Each is also loadable on its own with
``mitmdump -s addons/<name>.py --set taskgate_config=FILE``.
"""
