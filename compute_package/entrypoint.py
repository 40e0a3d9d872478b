#!/usr/bin/env python
"""FEDn entry points of the fedseg compute package (see fedseg_clinic/fedn_package.py).

FEDn runs ``python -S entrypoint.py <startup|train|validate|predict> ...`` (and
``python entrypoint.py build``) with this folder as the working directory; Python puts
this file's folder first on sys.path, so the bundled ``fedseg_clinic`` package is the
one imported. The warm path (fedseg_clinic/warm_client.py) needs only the standard
library; anything else re-executes this file with site-packages.
"""

import sys

from fedseg_clinic.warm_client import main

if __name__ == "__main__":
    main(__file__, sys.argv[1:])
