"""Per-layer KV storage, one kind per module (like transformers' ``cache_utils`` layers): each owns its tensors and
answers ``update``, ``get_seq_length``, ``get_mask_sizes``, ``crop`` and the row edits; none chooses what to keep.

=====================  ======================================================================================
``base``               read-only states, row edits, workspace, byte counts shared by every kind
``stream``             ``KVStream``: sink / packed body / residual spans of one of K or V
``mixed``              ``MixedPrecisionLayer`` (kind ``"mixed"``)
``slots``              ``CompressedLayer``: kept slots with their logical positions (kind ``"compressed"``)
``ragged``             ``RaggedLayer``: a different count per head (kind ``"ragged"``)
``lowrank``            ``LowRankLayer``, ``LowRankCompressedLayer``: rank-r factors (kinds ``"lowrank"``,
                       ``"lowrank_compressed"``); ``lowrank_store`` and ``rope`` are their helpers
=====================  ======================================================================================

The kind names are written into saved files: never rename one.
"""

from .accounting import CacheBytes
from .lowrank import LowRankCompressedLayer, LowRankLayer
from .mixed import MixedPrecisionLayer
from .ragged import RaggedLayer
from .slots import CompressedLayer
from .stream import KVStream

__all__ = [
    "CacheBytes",
    "CompressedLayer",
    "KVStream",
    "LowRankCompressedLayer",
    "LowRankLayer",
    "MixedPrecisionLayer",
    "RaggedLayer",
]
