"""Byte units shared by the engine and the optimizer."""

GIB = 1 << 30   # the original FlexGen's "GB" was 2^30 bytes, so every GiB budget is one of its GB
