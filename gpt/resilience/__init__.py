"""What keeps a run going and tells what went wrong: preemption, the watchdog and hang reports, node health,
stragglers and exclusion, goodput, and test-only fault injection."""
