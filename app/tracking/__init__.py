"""What happened to cards: the install log and state per platform, funnel events, Google
callbacks, support timelines."""
