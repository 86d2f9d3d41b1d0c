"""Checkpoint input and output: nothing here ever runs code from a file it reads.

What lives where:

* :mod:`repair.io.read` -- :func:`read_tensors` and :class:`TensorFile`: format sniffing by
  content, the safetensors header reader (size limit :data:`MAX_SAFETENSORS_HEADER`),
  torch zip/legacy loading, flattening to ``name -> tensor`` and tensor validation
  (:data:`ALLOWED_DTYPES`, NaN/Inf); also :func:`sha256_file`.
* :mod:`repair.io.unpickle` -- the restricted unpickler for Dassl-style ``torch.save`` files
  that ``weights_only`` refuses: allow-listed globals, inert placeholders for everything else.
* :mod:`repair.io.npz` -- numpy ``.npz`` archives, with ``.npy`` headers checked before any
  allocation and object arrays refused.
* :mod:`repair.io.write` -- the one atomic writer (:func:`atomic_output`) and what is built on
  it: :func:`write_safetensors` for user-named outputs (checked by :func:`check_output_path`),
  :func:`write_cache_entry` / :func:`read_cache_entry` for best-effort caches and
  :func:`write_state_file` for resumable training state.
"""

from repair.io.read import (
    ALLOWED_DTYPES,
    MAX_SAFETENSORS_HEADER,
    TensorFile,
    read_safetensors_metadata,
    read_tensors,
    sha256_file,
)
from repair.io.write import (
    append_text,
    atomic_output,
    check_appendable,
    check_output_path,
    check_writable,
    output_lock,
    tensors_checksum,
    read_cache_entry,
    write_cache_entry,
    write_safetensors,
    write_state_file,
)

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_SAFETENSORS_HEADER",
    "TensorFile",
    "append_text",
    "atomic_output",
    "check_appendable",
    "check_output_path",
    "check_writable",
    "output_lock",
    "tensors_checksum",
    "read_cache_entry",
    "read_safetensors_metadata",
    "read_tensors",
    "sha256_file",
    "write_cache_entry",
    "write_safetensors",
    "write_state_file",
]
