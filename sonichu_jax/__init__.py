"""SONICHU multi-task ultrasound biometry in JAX (work in progress; see the README's roadmap)."""
