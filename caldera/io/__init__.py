"""Files in and out: safetensors shards, the packed format, calibration text, the default model and corpus."""
