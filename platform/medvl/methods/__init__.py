"""Training methods, one module each, selected by `recipe.method` (see `base.py` for the seam).

Importing this package registers the built-in methods; `medvl.config.sections()` does it on first use.
"""
from medvl.methods.base import Method, Plugin, register_method, registered, resolve_method  # noqa: F401
from medvl.methods import clip  # noqa: F401,E402  (registers `clip`)
from medvl.methods import cxr_clip  # noqa: F401,E402  (registers `cxr_clip`)
from medvl.methods import pmc_clip  # noqa: F401,E402  (registers `pmc_clip`)
from medvl.methods import clip_it  # noqa: F401,E402  (registers `clip_it`)
from medvl.methods import clipin  # noqa: F401,E402  (registers the `clipin` plug-in; after the methods it wraps)
from medvl.methods import slice_classifier  # noqa: F401,E402  (registers `slice_classifier`: CLISC)
from medvl.methods import unet3d  # noqa: F401,E402  (registers `unet3d`: CLISC part 2)
