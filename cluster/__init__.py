"""Storage and cluster plumbing (filesystems, Ray init, runtime env, manifests)."""
