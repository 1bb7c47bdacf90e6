"""A run's lifecycle across attempts: identity and folder, the lease, the attempts log, start-up, lost ranks."""
