"""The torch side of PULSE: config, checkpoint loading, the reference model, the torch serving backend."""
