"""Cached outputs of frozen encoders (docs: theworld_core/features/cache.py).

- `cache`: the on-disk store (`FeatureCache`, `Namespace`, entry format, LRU eviction, stats).
- `keys`: what an entry is keyed by (`image_key`, `encoder_fingerprint`, preprocessing settings) and
  `bytes_per_sample` for `theworld plan`.
- `encoders`: `CachedEncoders`, TheWorld's frozen encoders behind the store, for the trainer.
"""
