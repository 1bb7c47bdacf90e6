"""Everything that goes wrong, from detection to decision to the next round: the decision (`decision.recover`), the
watchdog, heartbeats, hangs and their reports, the flight recorder, node health (measure, verdict, gate), lost ranks and
nodes, and in-job rounds (the task wrapper's agent and the standby rank). The training loop reaches it only through
the hooks gpt.resilience keeps (progress, preemption, stragglers, exclusion, goodput, disk faults, the lease)."""
