"""The hooks the training loop calls when something may go wrong: preemption, progress (what the rank is doing, for
its watchdog in launch.recovery), stragglers and exclusion, goodput, disk faults, the lease, timing constants, and
test-only fault injection."""
