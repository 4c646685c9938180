import sys

from escape_fast.demo.server import main

sys.exit(main())
