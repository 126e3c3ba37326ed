"""Built-in backends. Each is an ordinary hwlayer plugin, loaded through the same hooks as a
third-party package; vendor packages are imported lazily, inside detection or adapters."""
