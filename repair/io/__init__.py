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
* :mod:`repair.io.layout` / :mod:`repair.io.layouts` -- how a file's tensors are packaged (a flat file,
  a Dassl checkpoint (:mod:`repair.io.dassl`), a Hugging Face CLIP folder (:mod:`repair.io.hf_clip`),
  Tip-Adapter's cache files (:mod:`repair.io.tip_adapter`)) and :func:`write_layout`, which writes an
  output the way its input was packaged.
"""

from repair.io import read, write
from repair.io.layout import FLAT, Layout
from repair.io.layouts import OUTPUT_FORMATS, check_layout_output, output_layout, write_layout
from repair.io.read import *  # noqa: F403 (each module's __all__ is the package's surface)
from repair.io.write import *  # noqa: F403

__all__ = [*read.__all__, *write.__all__, "FLAT", "Layout", "OUTPUT_FORMATS", "check_layout_output",
           "output_layout", "write_layout"]
