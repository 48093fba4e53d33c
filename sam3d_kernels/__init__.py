"""Our own GPU ops, each with a pure-PyTorch reference that is also the CPU fallback.

This package never imports sam3d_core.

Sparse voxel ops (coords [N, 4] integer (batch, x, y, z); feats [N, C]):
  sparse_conv       build_neighbour_map, submanifold_conv3d (spconv SubMConv3d, weights [Cout, 3, 3, 3, Cin]);
                    fast path: a Triton gather-GEMM
  sparse_resample   downsample2 / upsample2 (the official mean-with-include_self quirk); PyTorch ops only
  sparse_attention  varlen_attention, window_partition, windowed_attention; fast path: PyTorch's flash varlen op
  rasterize         rasterize(pos, faces, H, W) -> Raster(face_id, bary), interpolate; fast path: Triton
                    atomic-min coverage (exact parity with the reference)
Dense ops:
  head_norm         head_rms_norm(x [..., H, D], gamma [H, D]): the q/k RMS norm; fast path: one Triton pass
                    over strided q/k slices (inference only)
Each dispatcher takes `backend="auto"` (fast path on CUDA where available, else the reference) and is
checked against its reference in tests/kernels (forward and backward) and timed in bench/kernels.py.
"""
