import sys

from proxy.cli._main import main

sys.exit(main())
