"""Backplanes: the `Log` interface and its implementations (memory; NATS JetStream)."""
