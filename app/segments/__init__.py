"""Marketer views over tracking: segments, campaign funnels, link exports."""
