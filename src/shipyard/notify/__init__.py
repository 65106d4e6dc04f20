"""Notifications (issue 16): sinks, signed webhooks, Slack, the durable outbox's writer and its
delivery worker. Below the orchestrator, the API and the CLI, which use it; above the store,
the audit log and security (sealing), which it uses."""
