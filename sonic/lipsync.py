"""`sonic.lipsync` as it was named before the engine had rooms: the same module as `sonic.post.lipsync`, so code written
as `from sonic.lipsync import measure` keeps working."""

import sys

from .post import lipsync as _lipsync

sys.modules[__name__] = _lipsync
