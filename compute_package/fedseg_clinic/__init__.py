"""fedseg_clinic: everything that runs at a clinic (shipped as the FEDn compute package).

This package must import with only the dependencies declared in
``compute_package/python_env.yaml``; it never imports from ``fedseg`` (the operator side).
Import TensorFlow only through :mod:`fedseg_clinic.tf_env`.
"""

__version__ = "0.1.0"
