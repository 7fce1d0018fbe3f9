"""The streaming engine: hidden-state store, routers, expert execution, the layer streamer, memory planning."""

from ream_lite.engine.store import HiddenStateStore
from ream_lite.engine.streamer import LayerStreamer, MoEObserver, StreamOptions

__all__ = ["HiddenStateStore", "LayerStreamer", "MoEObserver", "StreamOptions"]
