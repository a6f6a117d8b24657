"""taskgate's data plane without taskgate: the same Master, mitmproxy addons and options.

``python -m bench.mitm_min CONFIG PORT HOME`` reads the taskgate config the benchmark
wrote, and runs exactly what ``taskgate run`` embeds (proxyserver, next_layer,
tlsconfig, disable_h2c, with :func:`proxy.server.mitm_options`, on uvloop, with the
same hook table, addons/_hooks.py) but none of taskgate's addons. taskgate against
this row is the cost of identity, rules and audit alone; against plain mitmdump, the
cost of the whole product.
Like taskgate, it settles its heap (:func:`proxy.server.settle_heap`) once running and
trims it (:func:`proxy.server.trim_heap`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys

import uvloop
from mitmproxy import options
from mitmproxy.addons import disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from addons import HookTable
from proxy.config import load_config
from proxy.gateway import trust_bundle
from proxy.server import ensure_ca, mitm_options, settle_heap, trim_heap

__all__ = ["main"]


class Settle:
    """Settle the heap once the proxy runs, as ``taskgate run`` does."""

    def running(self) -> None:
        settle_heap()


async def serve(config_path: str, port: int, home: str) -> None:
    config = dataclasses.replace(load_config(config_path), home=home,
                                 proxy_listen=("127.0.0.1", port))
    ensure_ca(config)
    opts = options.Options()
    master = Master(opts, event_loop=asyncio.get_running_loop())
    HookTable.install(master)  # as taskgate's master does (addons/_hooks.py)
    master.addons.add(proxyserver.Proxyserver(), next_layer.NextLayer(),
                      tlsconfig.TlsConfig(), disable_h2c.DisableH2C(), Settle())
    opts.update(**mitm_options(config, trust_bundle(config)))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, master.shutdown)
    trimmer = asyncio.create_task(trim_heap())  # as taskgate does
    try:
        await master.run()
    finally:
        trimmer.cancel()


def main(argv: list[str]) -> int:
    config_path, port, home = argv
    uvloop.run(serve(config_path, int(port), home))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
