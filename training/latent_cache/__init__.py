"""The latent cache as a library: `store` (folder, index, keys), `shards` (one shard file),
`build` (ensure_cache), `read` (LatentReader), `maintenance` (verify, prune). `cache.py` is
its command line."""
