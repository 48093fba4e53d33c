"""What enters the program: photos and masks (`imageio`), camera intrinsics and point maps (`camera`), depth
models (`depth`). Every photo is read by `imageio.load_photo` and nothing else."""
