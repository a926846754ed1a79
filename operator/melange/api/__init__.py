"""The API layer: the MelangeAllocation spec and status models, validation and conditions.

Everything above it (plan, signals, controller, tools, cli) reads specs through this package.
"""

from melange.api.spec import *  # noqa: F403  (the spec model is the package's public face)
