"""A run's lifecycle across attempts: identity and folder, the lock, the attempts log, start-up, lost ranks."""
