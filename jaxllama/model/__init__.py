"""The Llama decoder, its attention kernels and published presets."""
