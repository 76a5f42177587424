"""Planning: which weights are quantized, along which axis, at how many bits, and which op each one runs as."""
