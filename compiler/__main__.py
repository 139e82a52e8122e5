import sys

from onnxpress.cli import main

sys.exit(main())
