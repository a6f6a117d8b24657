"""Thin mitmproxy addons around the taskgate core, one concern each.

The chain order is fixed by :data:`proxy.server.ADDON_CHAIN`: identify (who is
calling) → authorize (may it) → egress (where the name leads: every resolved
address judged, the connection pinned to it) → mcp (which tool, which arguments)
→ approve (does a person have to say yes) → inject (which secret goes on the
request) → audit (the record, the request id, streaming). Each module is also loadable on
its own with ``mitmdump -s addons/<name>.py --set taskgate_config=FILE``.
"""
