# The cffi extension built by csrc/libbpf_binding.py; cffi ships no type information.
from typing import Any

ffi: Any
lib: Any
