"""Model weights on disk: the store (`store`: data folder, manifests, hashes, atomic folders), importing and
loading (`hub`), the official file formats (`convert`) and the opt-in downloads (`download`)."""
