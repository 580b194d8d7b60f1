"""Interop with the steering ecosystem: GGUF control vectors (llama.cpp / repeng) and peer objects."""

from .gguf_cv import (
                      ControlVectorError,
                      inspect_control_vector,
                      read_control_vector,
                      read_control_vectors,
                      write_control_vector,
)
from .peers import from_repeng, from_steering_vector

__all__ = ["ControlVectorError", "inspect_control_vector", "read_control_vector", "read_control_vectors",
           "write_control_vector", "from_repeng", "from_steering_vector"]
