"""The one compiled part: the strict JSON reader's fast path (proxy/mcp/_scan.c).

Optional: without a C compiler the build still succeeds and the reader takes its
pure-Python path (same verdicts, slower on large bodies).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy.mcp._scan", ["proxy/mcp/_scan.c"], optional=True,
                             extra_compile_args=["-O2"])])
