"""Megatron-core integration of the same method (tensor, pipeline and data parallel groups, the
distributed optimizer). Not part of this release: the DeepSpeed engine in :mod:`fsam_ds` is."""
