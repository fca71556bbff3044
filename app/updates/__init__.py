"""Keeping installed cards current: batched re-render, Apple's web service, APNs pushes,
Google object sync, card operations."""
