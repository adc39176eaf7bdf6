"""Triton attention kernels for pruned models, imported as ``headslim.kernels``.

Placeholder: the kernels (uneven / ragged heads) land with their own issue. Importing this
package must stay cheap and must not require Triton or a GPU.
"""

__all__: list[str] = []
