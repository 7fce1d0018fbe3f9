"""Reading and writing safetensors checkpoints lazily: one tensor at a time, never a whole shard."""

from ream_lite.checkpoint.reader import CheckpointReader, load_config_dict, resolve_model_path
from ream_lite.checkpoint.writer import CheckpointWriter

__all__ = ["CheckpointReader", "CheckpointWriter", "load_config_dict", "resolve_model_path"]
