import sys

from switchformer.cli.main import main

sys.exit(main())
