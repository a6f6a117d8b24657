"""taskgate: the egress gateway for AI agents.

The core is a set of packages, one concern each, that import each other in one
direction only, from the bottom of this list up (``tests/test_layers.py`` fails on an
upward import or a cycle, including imports inside functions):

1. ``errors`` (the exception tree every refusal maps from), ``safe_text`` (the one
   rule for showing or accepting untrusted text: CLI output, control-plane input) and
   ``batching`` (the supervised writer-thread queue under the audit log and the state
   store) — three leaf modules that everything below the commands shares;
2. ``policy`` — hosts, paths, rules and decisions, the MCP grant model, ceilings;
3. ``identity`` (workload JWTs, task tokens, admin token), ``store`` (the state
   interface and its stores: SQLite, embedded; Redis, shared by replicas), ``mcp``
   (JSON-RPC on the wire);
4. ``audit`` — the tamper-evident log, its reader, verification and queries;
5. ``secrets`` — the broker, its providers, redaction, destination binding;
6. ``config`` — the config file and the files it names;
7. ``tasks`` (grants, budgets, expiry; which rules hold for a caller) and
   ``approvals`` (calls held for a person);
8. ``gateway`` — the data-plane core, and the builder of every service
   (:func:`proxy.gateway.build`);
9. ``control`` (the control plane), ``demo`` and, outside this package, ``addons``
   (thin mitmproxy adapters);
10. ``server`` — the one module that touches mitmproxy's ``Master``, and
    ``supervisor`` — with ``proxy.workers`` > 1, the process that runs the control plane
    and keeps the workers (each a ``server``) running;
11. ``cli`` — the ``taskgate`` command (and ``__main__``).

Nothing below ``server`` imports mitmproxy; ``addons`` import it and the core, never
the server.
"""

__version__ = "0.1.0"

# The layers above, bottom first: a module may import its own layer's and lower ones.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("proxy", "proxy.errors", "proxy.safe_text", "proxy.batching"),
    ("proxy.policy",),
    ("proxy.identity", "proxy.store", "proxy.mcp"),
    ("proxy.audit",),
    ("proxy.secrets",),
    ("proxy.config",),
    ("proxy.tasks", "proxy.approvals"),
    ("proxy.gateway",),
    ("proxy.control", "proxy.demo", "addons"),
    ("proxy.server", "proxy.supervisor"),
    ("proxy.cli", "proxy.__main__"),
)
