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
  :func:`write_state_file` for resumable training state; the output checks (writability probe,
  regular files only, the per-output lock) and checksummed cache entries.
"""

from repair.io import read, write
from repair.io.read import *  # noqa: F403 (each module's __all__ is the package's surface)
from repair.io.write import *  # noqa: F403

__all__ = [*read.__all__, *write.__all__]
