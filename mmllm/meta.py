"""Building without weights: parameters on the meta device, nothing downloaded or allocated.

``accelerate.init_empty_weights`` puts new parameters on the meta device without changing
the global default device, so modules imported meanwhile (feature extractors, audio
utilities) keep real tensors. Components ask ``building_on_meta()`` to skip weight loading.
"""

from __future__ import annotations

import contextlib
import contextvars

_ON_META = contextvars.ContextVar("mmllm_on_meta", default=False)


@contextlib.contextmanager
def meta_device():
    from accelerate import init_empty_weights

    token = _ON_META.set(True)
    try:
        with init_empty_weights():
            yield
    finally:
        _ON_META.reset(token)


def building_on_meta() -> bool:
    return _ON_META.get()
