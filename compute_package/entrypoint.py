#!/usr/bin/env python
"""FEDn entry points of the fedseg compute package (see fedseg_clinic/fedn_package.py).

FEDn runs ``python entrypoint.py <build|startup|train|validate|predict> ...`` with this
folder as the working directory; Python puts this file's folder first on sys.path, so
the bundled ``fedseg_clinic`` package is the one imported.
"""

from fedseg_clinic.fedn_package import main

if __name__ == "__main__":
    main()
