"""The paper's figure as code: preprocessing, stage 1 (coarse shape + layout), stage 2 (structured latent ->
Gaussians and mesh), the flow samplers, and `reconstruct.Pipeline`, which chains them with the clean-up, UV,
bake and export steps for one photo and any number of objects."""
