"""Webhooks: inbound loyalty-engine hooks (data in) and signed outbound events (data out)."""
