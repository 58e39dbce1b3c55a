"""DualTrack sensorless freehand 3D ultrasound in JAX/Flax."""
