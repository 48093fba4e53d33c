"""Writers for reconstructed objects (GLB, PLY, scene JSON). trimesh is imported lazily."""
