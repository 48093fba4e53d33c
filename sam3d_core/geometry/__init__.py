"""Geometry without networks: every frame convention (`frames`), pose decoding (`layout`), 3D Gaussians
(`gaussians`) and FlexiCubes mesh extraction (`flexicubes`)."""
