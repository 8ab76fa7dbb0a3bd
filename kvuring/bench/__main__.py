import sys

from kvuring.bench import main

sys.exit(main())
